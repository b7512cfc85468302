// The few system calls and the one hash that Node cannot do for us cheaply.
//
// - pipeSize: F_SETPIPE_SZ (Node has no fcntl; without this module a perl
//   one-liner is spawned instead, ~10 ms).
// - mapFile / dropPages: a read-only window of the image file, so that load
//   hands page-cache pages to write(2) directly instead of copying them into
//   a buffer with pread(2) first.
// - writeSegments: one writev(2) of many (buffer, offset, length) pieces,
//   described in a typed array so that no JS object is made per piece.
// - aio*: Linux AIO (--aio=native) and io_uring (--aio=io_uring) for O_DIRECT
//   reads and writes, with the raw system calls (no libaio, no liburing),
//   completions signalled on an eventfd that libuv polls on the main loop.
// - xxh64: XXH64 (seed 0) over memory Node already holds, without copying it
//   into WebAssembly memory first; incremental, its state in a caller's buffer.
// - copySegments: a gathered run copied into one (aligned) buffer in one
//   call, optionally hashed on the way.
// - waitReadable: poll(2) for the reader thread, which has no event loop.
//
// Everything here is optional: the JS side falls back when the module is
// not built. Errors are thrown as Error objects whose `code` is the errno
// name, like Node's own.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <linux/io_uring.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <uv.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define CHECK(call)                                                          \
  do {                                                                       \
    if ((call) != napi_ok) {                                                 \
      napi_throw_error(env, "EINVAL", "qemu-snap native: bad arguments");    \
      return NULL;                                                           \
    }                                                                        \
  } while (0)

static napi_value throw_errno(napi_env env, const char *what, int err) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
  const char *code = "EIO";
  switch (err) {
    case EPIPE: code = "EPIPE"; break;
    case EBADF: code = "EBADF"; break;
    case EINVAL: code = "EINVAL"; break;
    case ENOMEM: code = "ENOMEM"; break;
    case EPERM: code = "EPERM"; break;
    case EACCES: code = "EACCES"; break;
    case ENOSPC: code = "ENOSPC"; break;
    case EFAULT: code = "EFAULT"; break;
    case ENODEV: code = "ENODEV"; break;
    case EBUSY: code = "EBUSY"; break;
    case EEXIST: code = "EEXIST"; break;
    case ENOENT: code = "ENOENT"; break;
    case ENOTDIR: code = "ENOTDIR"; break;
    case EXDEV: code = "EXDEV"; break;
    case EOPNOTSUPP: code = "EOPNOTSUPP"; break;
    case EROFS: code = "EROFS"; break;
  }
  napi_throw_error(env, code, msg);
  return NULL;
}

static int get_i64(napi_env env, napi_value v, int64_t *out) {
  return napi_get_value_int64(env, v, out) == napi_ok;
}

// pipeSize(fd, bytes) -> the size granted
static napi_value pipe_size(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t fd, bytes;
  if (argc < 2 || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &bytes)) CHECK(napi_invalid_arg);
  int r = fcntl((int)fd, F_SETPIPE_SZ, (int)bytes);
  if (r < 0) return throw_errno(env, "fcntl(F_SETPIPE_SZ)", errno);
  napi_value out;
  CHECK(napi_create_int64(env, r, &out));
  return out;
}

// ---- mapped windows ----

typedef struct {
  void *addr;
  size_t length;
} Mapping;

static void unmap_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)data;
  Mapping *m = hint;
  munmap(m->addr, m->length);
  free(m);
}

// mapFile(fd, offset, length) -> Buffer over the file's bytes, read-only
// (writing to it kills the process). Unmapped when the Buffer is collected.
static napi_value map_file(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t fd, offset, length;
  if (argc < 3 || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &offset) || !get_i64(env, argv[2], &length))
    CHECK(napi_invalid_arg);
  long page = sysconf(_SC_PAGESIZE);
  if (offset < 0 || length <= 0 || offset % page != 0) return throw_errno(env, "mmap", EINVAL);
  void *addr = mmap(NULL, (size_t)length, PROT_READ, MAP_SHARED, (int)fd, (off_t)offset);
  if (addr == MAP_FAILED) return throw_errno(env, "mmap", errno);
  // Read front to back: the kernel may read ahead and drop behind.
  madvise(addr, (size_t)length, MADV_SEQUENTIAL);
  Mapping *m = malloc(sizeof *m);
  if (!m) {
    munmap(addr, (size_t)length);
    return throw_errno(env, "mmap", ENOMEM);
  }
  m->addr = addr;
  m->length = (size_t)length;
  napi_value buf;
  if (napi_create_external_buffer(env, (size_t)length, addr, unmap_finalize, m, &buf) != napi_ok) {
    munmap(addr, (size_t)length);
    free(m);
    napi_throw_error(env, "ENOMEM", "mmap: cannot wrap the mapping in a Buffer");
    return NULL;
  }
  return buf;
}

// dropPages(buffer) -> undefined: the whole pages inside `buffer` leave this
// process's memory (MADV_DONTNEED). For a window of mapFile(): its pages
// stay in the page cache and are read again if touched, so this only trims
// the resident set, which would otherwise grow with the image until the
// window is collected.
static napi_value drop_pages(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *data;
  size_t len;
  if (argc < 1) CHECK(napi_invalid_arg);
  CHECK(napi_get_buffer_info(env, argv[0], &data, &len));
  uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  uintptr_t start = ((uintptr_t)data + page - 1) & ~(page - 1);
  uintptr_t end = ((uintptr_t)data + len) & ~(page - 1);
  if (end > start && madvise((void *)start, end - start, MADV_DONTNEED) != 0) return throw_errno(env, "madvise", errno);
  return NULL;
}

// ---- gathered writes ----

#define MAX_IOV 1024

// Reads the buffers and the segment triples of a segments call. Returns 0
// and throws on bad arguments.
typedef struct {
  uint8_t *bases[16];
  size_t lens[16];
  uint32_t nbufs;
  const double *seg;
  int64_t count;
} Segments;

static int get_segments(napi_env env, napi_value buffers, napi_value segments, napi_value count, Segments *out) {
  if (!get_i64(env, count, &out->count) || napi_get_array_length(env, buffers, &out->nbufs) != napi_ok) {
    napi_throw_error(env, "EINVAL", "segments: bad arguments");
    return 0;
  }
  if (out->nbufs > 16) {
    throw_errno(env, "segments: more than 16 buffers", EINVAL);
    return 0;
  }
  for (uint32_t i = 0; i < out->nbufs; i++) {
    napi_value b;
    void *d;
    if (napi_get_element(env, buffers, i, &b) != napi_ok || napi_get_buffer_info(env, b, &d, &out->lens[i]) != napi_ok) {
      napi_throw_error(env, "EINVAL", "segments: a buffer is not a Buffer");
      return 0;
    }
    out->bases[i] = d;
  }
  napi_typedarray_type type;
  size_t n;
  void *data;
  if (napi_get_typedarray_info(env, segments, &type, &n, &data, NULL, NULL) != napi_ok || type != napi_float64_array ||
      out->count < 0 || (size_t)out->count * 3 > n) {
    throw_errno(env, "segments: not a Float64Array of count triples", EINVAL);
    return 0;
  }
  out->seg = data;
  for (int64_t i = 0; i < out->count; i++) {
    const double *s = out->seg + i * 3;
    if (!(s[0] >= 0 && s[0] < out->nbufs && s[1] >= 0 && s[2] >= 0 && s[1] + s[2] <= (double)out->lens[(uint32_t)s[0]])) {
      throw_errno(env, "segments: segment out of range", EINVAL);
      return 0;
    }
  }
  return 1;
}

// writeSegments(fd, buffers, segments, count) -> bytes written.
// segments is a Float64Array of (buffer index, offset, length) triples.
// Writes them in order, waiting in poll(2) when the descriptor is
// non-blocking and full. The optional fifth argument bounds that wait, in
// milliseconds over the whole call (default: no bound): when it runs out the
// call returns what it wrote so far, so that the caller's thread gets back
// to its event loop (signals, an abort) while a reader stalls.
static napi_value write_segments(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t fd;
  int64_t max_wait = -1;
  if (argc < 4 || !get_i64(env, argv[0], &fd)) CHECK(napi_invalid_arg);
  if (argc >= 5) {
    napi_valuetype t;
    CHECK(napi_typeof(env, argv[4], &t));
    if (t != napi_undefined && !get_i64(env, argv[4], &max_wait)) CHECK(napi_invalid_arg);
  }
  struct timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += max_wait / 1000;
  deadline.tv_nsec += (max_wait % 1000) * 1000000L;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000L;
  }
  Segments sg;
  if (!get_segments(env, argv[1], argv[2], argv[3], &sg)) return NULL;
  struct iovec iov[MAX_IOV];
  int64_t total = 0;
  int64_t i = 0;
  while (i < sg.count) {
    int k = 0;
    for (; k < MAX_IOV && i + k < sg.count; k++) {
      const double *s = sg.seg + (i + k) * 3;
      iov[k].iov_base = sg.bases[(uint32_t)s[0]] + (size_t)s[1];
      iov[k].iov_len = (size_t)s[2];
    }
    // Write these k pieces whole, resuming after partial writes.
    struct iovec *v = iov;
    int left = k;
    while (left > 0) {
      ssize_t w = writev((int)fd, v, left);
      if (w < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) {
          int timeout = -1;
          if (max_wait >= 0) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            int64_t ms = (int64_t)(deadline.tv_sec - now.tv_sec) * 1000 + (deadline.tv_nsec - now.tv_nsec) / 1000000L;
            if (ms <= 0) goto out;
            timeout = (int)ms;
          }
          struct pollfd p = {.fd = (int)fd, .events = POLLOUT};
          poll(&p, 1, timeout);
          continue;
        }
        return throw_errno(env, "write", errno);
      }
      total += w;
      while (left > 0 && (size_t)w >= v->iov_len) {
        w -= (ssize_t)v->iov_len;
        v++;
        left--;
      }
      if (left > 0) {
        v->iov_base = (uint8_t *)v->iov_base + w;
        v->iov_len -= (size_t)w;
      }
    }
    i += k;
  }
out:;
  napi_value out;
  CHECK(napi_create_int64(env, total, &out));
  return out;
}

// setNonBlocking(fd): O_NONBLOCK on the descriptor's open file, so that a
// write to a full pipe returns EAGAIN instead of sleeping where no signal
// handler of ours can run (the kernel restarts the write after libuv's).
static napi_value set_non_blocking(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t fd;
  if (argc < 1 || !get_i64(env, argv[0], &fd)) CHECK(napi_invalid_arg);
  int flags = fcntl((int)fd, F_GETFL);
  if (flags < 0 || fcntl((int)fd, F_SETFL, flags | O_NONBLOCK) < 0) return throw_errno(env, "fcntl(F_SETFL, O_NONBLOCK)", errno);
  return NULL;
}

// waitReadable(fd, timeoutMs) -> boolean: whether `fd` has input (or a
// hang-up, which the next read reports) within timeoutMs, by poll(2). The
// reader thread asks this when a pipe runs dry in the middle of a chunk: the
// writer's next piece is usually microseconds away, and waiting for it keeps
// the chunk filling instead of handing over a part-filled one. An
// interrupted wait counts as nothing yet.
static napi_value wait_readable(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t fd, ms;
  if (argc < 2 || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &ms) || ms < 0 || ms > 60000) CHECK(napi_invalid_arg);
  struct pollfd p = {.fd = (int)fd, .events = POLLIN};
  int r = poll(&p, 1, (int)ms);
  if (r < 0 && errno != EINTR) return throw_errno(env, "poll", errno);
  napi_value out;
  CHECK(napi_get_boolean(env, r > 0, &out));
  return out;
}

// exitNow(code): _exit(2). process.exit joins Node's worker threads and
// thread pool first, and a thread blocked in a system call (a read of an
// idle pipe) would hold the process forever after an interrupt.
static napi_value exit_now(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t code = 1;
  if (argc >= 1) get_i64(env, argv[0], &code);
  _exit((int)code);
}

// linkFd(fd, path): linkat(2) of an open file (an O_TMPFILE one) at `path`,
// through /proc/self/fd with AT_SYMLINK_FOLLOW (linkat(fd, "", AT_EMPTY_PATH)
// needs CAP_DAC_READ_SEARCH). Fails with EEXIST when `path` exists.
static napi_value link_fd(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t fd;
  char target[4096];
  size_t len;
  if (argc < 2 || !get_i64(env, argv[0], &fd)) CHECK(napi_invalid_arg);
  if (napi_get_value_string_utf8(env, argv[1], target, sizeof target, &len) != napi_ok || len >= sizeof target - 1) CHECK(napi_invalid_arg);
  char proc[64];
  snprintf(proc, sizeof proc, "/proc/self/fd/%d", (int)fd);
  if (linkat(AT_FDCWD, proc, AT_FDCWD, target, AT_SYMLINK_FOLLOW) < 0) return throw_errno(env, "linkat", errno);
  return NULL;
}

// pwriteSegments(fd, position, buffers, segments, count, skip, length) ->
// bytes written: `length` bytes of what the segments describe, from `skip`
// bytes into it, at file offset `position` (pwritev, resumed after short
// writes).
static napi_value pwrite_segments(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t fd, position, skip, length;
  if (argc < 7 || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &position) || !get_i64(env, argv[5], &skip) ||
      !get_i64(env, argv[6], &length))
    CHECK(napi_invalid_arg);
  Segments sg;
  if (!get_segments(env, argv[2], argv[3], argv[4], &sg)) return NULL;
  if (position < 0 || skip < 0 || length < 0) return throw_errno(env, "pwriteSegments", EINVAL);
  struct iovec iov[MAX_IOV];
  int64_t i = 0;
  // Find the first segment holding byte `skip`.
  while (i < sg.count && skip >= (int64_t)sg.seg[i * 3 + 2]) {
    skip -= (int64_t)sg.seg[i * 3 + 2];
    i++;
  }
  int64_t left = length, written = 0;
  while (left > 0) {
    int k = 0;
    int64_t batch = 0;
    for (; k < MAX_IOV && i < sg.count && batch < left; i++) {
      const double *s = sg.seg + i * 3;
      size_t off = (size_t)s[1] + (size_t)skip;
      size_t avail = (size_t)s[2] - (size_t)skip;
      skip = 0;
      if (avail == 0) continue;
      size_t len = (int64_t)avail > left - batch ? (size_t)(left - batch) : avail;
      iov[k].iov_base = sg.bases[(uint32_t)s[0]] + off;
      iov[k].iov_len = len;
      batch += (int64_t)len;
      k++;
      // Cut short by `length`: this is the last piece (and i stays on it).
      if (len < avail) break;
    }
    if (batch == 0) return throw_errno(env, "pwriteSegments: the segments hold fewer bytes than asked", EINVAL);
    struct iovec *v = iov;
    int n = k;
    while (n > 0) {
      ssize_t w = pwritev((int)fd, v, n, (off_t)(position + written));
      if (w < 0) {
        if (errno == EINTR) continue;
        return throw_errno(env, "pwrite", errno);
      }
      if (w == 0) return throw_errno(env, "pwrite", EIO);
      written += w;
      while (n > 0 && (size_t)w >= v->iov_len) {
        w -= (ssize_t)v->iov_len;
        v++;
        n--;
      }
      if (n > 0) {
        v->iov_base = (uint8_t *)v->iov_base + w;
        v->iov_len -= (size_t)w;
      }
    }
    left -= batch;
  }
  napi_value out;
  CHECK(napi_create_int64(env, written, &out));
  return out;
}

// ---- XXH64 ----
// Written from the algorithm's description (Yann Collet's xxHash spec).

static const uint64_t P1 = 0x9E3779B185EBCA87ULL;
static const uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
static const uint64_t P3 = 0x165667B19E3779F9ULL;
static const uint64_t P4 = 0x85EBCA77C2B2AE63ULL;
static const uint64_t P5 = 0x27D4EB2F165667C5ULL;

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t rd64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;  // x86 and arm64 Linux are little-endian, as XXH64 reads
}
static inline uint32_t rd32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}
static inline uint64_t xround(uint64_t acc, uint64_t in) {
  acc += in * P2;
  acc = rotl(acc, 31);
  return acc * P1;
}
static inline uint64_t xmerge(uint64_t h, uint64_t v) {
  h ^= xround(0, v);
  return h * P1 + P4;
}

// The state a caller keeps in a Buffer of XXH_STATE_BYTES.
typedef struct {
  uint64_t total;
  uint64_t v[4];
  uint8_t mem[32];
  uint32_t memLen;
  uint32_t pad;
} XxhState;
#define XXH_STATE_BYTES ((int)sizeof(XxhState))

static void xxh_reset(XxhState *s) {
  memset(s, 0, sizeof *s);
  s->v[0] = P1 + P2;
  s->v[1] = P2;
  s->v[2] = 0;
  s->v[3] = 0 - P1;
}

static void xxh_update(XxhState *s, const uint8_t *p, size_t len) {
  s->total += len;
  if (s->memLen + len < 32) {
    memcpy(s->mem + s->memLen, p, len);
    s->memLen += (uint32_t)len;
    return;
  }
  uint64_t v0 = s->v[0], v1 = s->v[1], v2 = s->v[2], v3 = s->v[3];
  if (s->memLen) {
    size_t fill = 32 - s->memLen;
    memcpy(s->mem + s->memLen, p, fill);
    v0 = xround(v0, rd64(s->mem));
    v1 = xround(v1, rd64(s->mem + 8));
    v2 = xround(v2, rd64(s->mem + 16));
    v3 = xround(v3, rd64(s->mem + 24));
    p += fill;
    len -= fill;
    s->memLen = 0;
  }
  while (len >= 32) {
    v0 = xround(v0, rd64(p));
    v1 = xround(v1, rd64(p + 8));
    v2 = xround(v2, rd64(p + 16));
    v3 = xround(v3, rd64(p + 24));
    p += 32;
    len -= 32;
  }
  s->v[0] = v0, s->v[1] = v1, s->v[2] = v2, s->v[3] = v3;
  memcpy(s->mem, p, len);
  s->memLen = (uint32_t)len;
}

static uint64_t xxh_digest(const XxhState *s) {
  uint64_t h;
  if (s->total >= 32) {
    h = rotl(s->v[0], 1) + rotl(s->v[1], 7) + rotl(s->v[2], 12) + rotl(s->v[3], 18);
    for (int i = 0; i < 4; i++) h = xmerge(h, s->v[i]);
  } else {
    h = P5;  // seed 0
  }
  h += s->total;
  const uint8_t *p = s->mem;
  size_t len = s->memLen;
  for (; len >= 8; p += 8, len -= 8) h = rotl(h ^ xround(0, rd64(p)), 27) * P1 + P4;
  if (len >= 4) {
    h = rotl(h ^ ((uint64_t)rd32(p) * P1), 23) * P2 + P3;
    p += 4;
    len -= 4;
  }
  for (; len > 0; p++, len--) h = rotl(h ^ (*p * P5), 11) * P1;
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

static XxhState *state_arg(napi_env env, napi_value v) {
  void *d;
  size_t len;
  if (napi_get_buffer_info(env, v, &d, &len) != napi_ok || len < sizeof(XxhState) || ((uintptr_t)d & 7) != 0) return NULL;
  return d;
}

// xxh64Reset(state)
static napi_value xxh64_reset(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  XxhState *s = argc >= 1 ? state_arg(env, argv[0]) : NULL;
  if (!s) CHECK(napi_invalid_arg);
  xxh_reset(s);
  return NULL;
}

// xxh64Update(state, data)
static napi_value xxh64_update(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  XxhState *s = argc >= 2 ? state_arg(env, argv[0]) : NULL;
  if (!s) CHECK(napi_invalid_arg);
  void *d;
  size_t len;
  CHECK(napi_get_buffer_info(env, argv[1], &d, &len));
  xxh_update(s, d, len);
  return NULL;
}

// xxh64UpdateSegments(state, buffers, segments, count): the bytes the
// segments describe, in order.
static napi_value xxh64_update_segments(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  XxhState *s = argc >= 4 ? state_arg(env, argv[0]) : NULL;
  if (!s) CHECK(napi_invalid_arg);
  Segments sg;
  if (!get_segments(env, argv[1], argv[2], argv[3], &sg)) return NULL;
  for (int64_t i = 0; i < sg.count; i++) {
    const double *g = sg.seg + i * 3;
    xxh_update(s, sg.bases[(uint32_t)g[0]] + (size_t)g[1], (size_t)g[2]);
  }
  return NULL;
}

// copySegments(dst, buffers, segments, count[, state]) -> bytes copied: the
// bytes the segments describe, in order, to dst from its start (which must
// hold them all). With an XXH64 state, each piece is also hashed right after
// it is copied, while it is still in the L1 cache: one pass over memory for
// the copy and the digest, where two separate calls make two (on the bench
// VM the hash's own pass cost about as much as the copy).
static napi_value copy_segments(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4) CHECK(napi_invalid_arg);
  void *dst;
  size_t dlen;
  CHECK(napi_get_buffer_info(env, argv[0], &dst, &dlen));
  XxhState *s = NULL;
  if (argc >= 5) {
    napi_valuetype t;
    CHECK(napi_typeof(env, argv[4], &t));
    if (t != napi_undefined && !(s = state_arg(env, argv[4]))) CHECK(napi_invalid_arg);
  }
  Segments sg;
  if (!get_segments(env, argv[1], argv[2], argv[3], &sg)) return NULL;
  size_t total = 0;
  for (int64_t i = 0; i < sg.count; i++) total += (size_t)sg.seg[i * 3 + 2];
  if (total > dlen) return throw_errno(env, "copySegments: the segments hold more bytes than the destination", EINVAL);
  uint8_t *out = dst;
  for (int64_t i = 0; i < sg.count; i++) {
    const double *g = sg.seg + i * 3;
    size_t len = (size_t)g[2];
    memcpy(out, sg.bases[(uint32_t)g[0]] + (size_t)g[1], len);
    if (s) xxh_update(s, out, len);
    out += len;
  }
  napi_value n;
  CHECK(napi_create_int64(env, (int64_t)total, &n));
  return n;
}

// xxh64Low(state) -> the low 32 bits of the digest, unsigned
static napi_value xxh64_low(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  XxhState *s = argc >= 1 ? state_arg(env, argv[0]) : NULL;
  if (!s) CHECK(napi_invalid_arg);
  napi_value out;
  CHECK(napi_create_uint32(env, (uint32_t)xxh_digest(s), &out));
  return out;
}

// ---- fd passing (QMP getfd) ----
//
// QEMU takes file descriptors over its QMP socket as SCM_RIGHTS ancillary
// data on the message that carries the `getfd` command. Node cannot send
// ancillary data on a net.Socket, and has no socketpair(2).

// socketPair(bufferBytes?) -> [fd0, fd1]: a connected AF_UNIX stream pair,
// blocking, close-on-exec. With bufferBytes, both ends get SO_SNDBUF and
// SO_RCVBUF of that size (best effort, capped by net.core.wmem_max): like a
// 1 MiB pipe, fewer hand-offs between writer and reader.
static napi_value socket_pair(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t bytes = 0;
  if (argc >= 1 && !get_i64(env, argv[0], &bytes)) bytes = 0;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return throw_errno(env, "socketpair", errno);
  if (bytes > 0 && bytes <= (1 << 30)) {
    int size = (int)bytes;
    for (int i = 0; i < 2; i++) {
      setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
      setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    }
  }
  napi_value out, a, b;
  if (napi_create_array_with_length(env, 2, &out) != napi_ok || napi_create_int32(env, sv[0], &a) != napi_ok ||
      napi_create_int32(env, sv[1], &b) != napi_ok || napi_set_element(env, out, 0, a) != napi_ok ||
      napi_set_element(env, out, 1, b) != napi_ok) {
    close(sv[0]);
    close(sv[1]);
    napi_throw_error(env, "ENOMEM", "socketpair: cannot return the pair");
    return NULL;
  }
  return out;
}

// sendFd(sockFd, fd, data) -> bytes sent: sendmsg(2) of `data` with `fd` as
// SCM_RIGHTS. The socket may be non-blocking (Node's): a full socket is
// waited out with poll(2), at most 5 s. The descriptor rides on the first
// byte; what a short send left is sent plainly.
static napi_value send_fd(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t sock, fd;
  void *data = NULL;
  size_t length = 0;
  if (argc < 3 || !get_i64(env, argv[0], &sock) || !get_i64(env, argv[1], &fd) ||
      napi_get_buffer_info(env, argv[2], &data, &length) != napi_ok || length == 0)
    CHECK(napi_invalid_arg);
  size_t done = 0;
  while (done < length) {
    struct iovec iov = {(char *)data + done, length - done};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    union {
      char buf[CMSG_SPACE(sizeof(int))];
      struct cmsghdr align;
    } control;
    if (done == 0) {
      memset(&control, 0, sizeof control);
      msg.msg_control = control.buf;
      msg.msg_controllen = sizeof control.buf;
      struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      int passed = (int)fd;
      memcpy(CMSG_DATA(c), &passed, sizeof passed);
    }
    ssize_t n = sendmsg((int)sock, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        struct pollfd p = {(int)sock, POLLOUT, 0};
        int r = poll(&p, 1, 5000);
        if (r == 0) return throw_errno(env, "sendmsg(SCM_RIGHTS)", ETIMEDOUT);
        if (r < 0 && errno != EINTR) return throw_errno(env, "poll", errno);
        continue;
      }
      return throw_errno(env, "sendmsg(SCM_RIGHTS)", errno);
    }
    done += (size_t)n;
  }
  napi_value out;
  CHECK(napi_create_int64(env, (int64_t)done, &out));
  return out;
}

// ---- direct I/O (cache modes none and directsync) ----
// O_DIRECT needs buffers, file offsets and lengths aligned to what the file
// system and device ask for. Node's Buffers have no alignment guarantee and
// JS cannot see an address, so the aligned memory comes from here.

static void aligned_finalize(napi_env env, void *data, void *hint) {
  int64_t adjusted;
  napi_adjust_external_memory(env, -(int64_t)(uintptr_t)hint, &adjusted);
  free(data);
}

// alignedBuffer(size, align) -> a Buffer of `size` bytes whose address is a
// multiple of `align` (a power of two), not zeroed; freed when collected.
static napi_value aligned_buffer(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t size, align;
  if (argc < 2 || !get_i64(env, argv[0], &size) || !get_i64(env, argv[1], &align)) CHECK(napi_invalid_arg);
  if (size <= 0 || align < (int64_t)sizeof(void *) || (align & (align - 1)) != 0) return throw_errno(env, "alignedBuffer", EINVAL);
  void *p = NULL;
  int r = posix_memalign(&p, (size_t)align, (size_t)size);
  if (r != 0) return throw_errno(env, "posix_memalign", r);
  napi_value buf;
  if (napi_create_external_buffer(env, (size_t)size, p, aligned_finalize, (void *)(uintptr_t)size, &buf) != napi_ok) {
    free(p);
    napi_throw_error(env, "ENOMEM", "alignedBuffer: cannot wrap the memory in a Buffer");
    return NULL;
  }
  int64_t adjusted;
  napi_adjust_external_memory(env, size, &adjusted);
  return buf;
}

// addressModulo(buffer, align) -> the buffer's address modulo `align`
// (0 when it may be handed to an O_DIRECT read or write as it is).
static napi_value address_modulo(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t align;
  void *data;
  size_t len;
  if (argc < 2 || !get_i64(env, argv[1], &align) || align <= 0) CHECK(napi_invalid_arg);
  CHECK(napi_get_buffer_info(env, argv[0], &data, &len));
  napi_value out;
  CHECK(napi_create_int64(env, (int64_t)((uintptr_t)data % (uintptr_t)align), &out));
  return out;
}

// dioAlign(fd) -> [memory alignment, offset alignment] for O_DIRECT on fd:
// statx(STATX_DIOALIGN) where the kernel (6.1+) and file system report it,
// else BLKSSZGET for a block device, else [0, 0] (unknown: the caller
// assumes 4096). [0, 0] also when the file system reports no direct I/O.
static napi_value dio_align(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t fd;
  if (argc < 1 || !get_i64(env, argv[0], &fd)) CHECK(napi_invalid_arg);
  uint32_t mem = 0, off = 0;
#ifdef STATX_DIOALIGN
  struct statx stx;
  if (statx((int)fd, "", AT_EMPTY_PATH, STATX_DIOALIGN | STATX_TYPE, &stx) == 0) {
    if (stx.stx_mask & STATX_DIOALIGN) {
      mem = stx.stx_dio_mem_align;
      off = stx.stx_dio_offset_align;
    } else if (S_ISBLK(stx.stx_mode)) {
      int ss = 0;
      if (ioctl((int)fd, BLKSSZGET, &ss) == 0 && ss > 0) mem = off = (uint32_t)ss;
    }
  }
#else
  struct stat st;
  if (fstat((int)fd, &st) == 0 && S_ISBLK(st.st_mode)) {
    int ss = 0;
    if (ioctl((int)fd, BLKSSZGET, &ss) == 0 && ss > 0) mem = off = (uint32_t)ss;
  }
#endif
  napi_value out, a, b;
  CHECK(napi_create_array_with_length(env, 2, &out));
  CHECK(napi_create_uint32(env, mem, &a));
  CHECK(napi_create_uint32(env, off, &b));
  CHECK(napi_set_element(env, out, 0, a));
  CHECK(napi_set_element(env, out, 1, b));
  return out;
}

// ---- asynchronous I/O engines: Linux AIO (--aio=native) and io_uring ----
// The kernel's own asynchronous I/O, as QEMU's aio=native and aio=io_uring
// use it, for O_DIRECT files (Linux AIO is only asynchronous for those).
// Requests are submitted straight from the main thread, with the raw system
// calls (no libaio, no liburing: glibc has no wrappers). Each completion
// signals an eventfd (IOCB_FLAG_RESFD; IORING_REGISTER_EVENTFD) that libuv
// polls on the main loop; the poll callback reaps what is done without
// blocking and calls the JS completion function once per request with
// (tag, result): bytes done, or -errno.
// At most `max` requests are in the kernel (submitted and not yet reaped):
// aioSubmit refuses (returns false) beyond that, and JS queues.

enum { ENGINE_LINUX_AIO = 0, ENGINE_IO_URING = 1 };

typedef struct AioRequest AioRequest;

typedef struct {
  uint32_t *head, *tail, *array;
  uint32_t mask;
  struct io_uring_sqe *sqes;
  uint32_t *cq_head, *cq_tail;
  uint32_t cq_mask;
  struct io_uring_cqe *cqes;
  void *sq_map, *cq_map;
  size_t sq_map_len, cq_map_len, sqes_len;
} Uring;

typedef struct {
  int kind;
  aio_context_t ctx;  // Linux AIO
  int ring_fd;        // io_uring
  Uring ring;
  int efd;
  uv_poll_t poll;
  napi_env env;
  napi_ref callback;
  napi_async_context async;
  uint32_t max;
  uint32_t inflight;
  uint32_t peak;
  uint64_t submitted;
  int polling;
  int closed;
  // Freed once libuv has closed the poll handle and the JS handle is
  // collected, whichever comes last.
  int handle_closed;
  int finalized;
  // Requests in the kernel, so that those a close waits for are freed too.
  AioRequest *live;
} AioEngine;

struct AioRequest {
  AioRequest *prev, *next;
  double tag;
  struct iocb cb;
  struct iovec iov[];
};

static void aio_unlink(AioEngine *e, AioRequest *r) {
  if (r->prev) r->prev->next = r->next;
  else e->live = r->next;
  if (r->next) r->next->prev = r->prev;
  free(r);
}

static long sys_io_setup(unsigned nr, aio_context_t *ctx) { return syscall(__NR_io_setup, nr, ctx); }
static long sys_io_destroy(aio_context_t ctx) { return syscall(__NR_io_destroy, ctx); }
static long sys_io_submit(aio_context_t ctx, long n, struct iocb **cbs) { return syscall(__NR_io_submit, ctx, n, cbs); }
static long sys_io_getevents(aio_context_t ctx, long min, long max, struct io_event *ev, struct timespec *ts) {
  return syscall(__NR_io_getevents, ctx, min, max, ev, ts);
}
static long sys_uring_setup(unsigned entries, struct io_uring_params *p) { return syscall(__NR_io_uring_setup, entries, p); }
static long sys_uring_enter(int fd, unsigned submit, unsigned min, unsigned flags) {
  return syscall(__NR_io_uring_enter, fd, submit, min, flags, NULL, 0);
}
static long sys_uring_register(int fd, unsigned op, void *arg, unsigned n) { return syscall(__NR_io_uring_register, fd, op, arg, n); }

static void uring_unmap(AioEngine *e) {
  Uring *q = &e->ring;
  if (q->sqes) munmap(q->sqes, q->sqes_len);
  if (q->cq_map && q->cq_map != q->sq_map) munmap(q->cq_map, q->cq_map_len);
  if (q->sq_map) munmap(q->sq_map, q->sq_map_len);
  q->sqes = NULL;
  q->sq_map = q->cq_map = NULL;
}

// io_uring_setup and the three shared mappings (one when the kernel has
// IORING_FEAT_SINGLE_MMAP); 0 or an errno.
static int uring_open(AioEngine *e, unsigned entries) {
  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  long fd = sys_uring_setup(entries, &p);
  if (fd < 0) return errno;
  e->ring_fd = (int)fd;
  Uring *q = &e->ring;
  q->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
  q->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
  if (single && q->cq_map_len > q->sq_map_len) q->sq_map_len = q->cq_map_len;
  q->sq_map = mmap(NULL, q->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, e->ring_fd, IORING_OFF_SQ_RING);
  if (q->sq_map == MAP_FAILED) {
    q->sq_map = NULL;
    return errno;
  }
  if (single) q->cq_map = q->sq_map;
  else {
    q->cq_map = mmap(NULL, q->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, e->ring_fd, IORING_OFF_CQ_RING);
    if (q->cq_map == MAP_FAILED) {
      q->cq_map = NULL;
      return errno;
    }
  }
  q->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
  q->sqes = mmap(NULL, q->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, e->ring_fd, IORING_OFF_SQES);
  if (q->sqes == MAP_FAILED) {
    q->sqes = NULL;
    return errno;
  }
  char *sq = q->sq_map, *cq = q->cq_map;
  q->head = (uint32_t *)(sq + p.sq_off.head);
  q->tail = (uint32_t *)(sq + p.sq_off.tail);
  q->mask = *(uint32_t *)(sq + p.sq_off.ring_mask);
  q->array = (uint32_t *)(sq + p.sq_off.array);
  q->cq_head = (uint32_t *)(cq + p.cq_off.head);
  q->cq_tail = (uint32_t *)(cq + p.cq_off.tail);
  q->cq_mask = *(uint32_t *)(cq + p.cq_off.ring_mask);
  q->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
  // max <= sq_entries, and the CQ ring is twice that: it cannot overflow.
  if (p.sq_entries < entries) return EINVAL;
  int32_t efd = e->efd;
  if (sys_uring_register(e->ring_fd, IORING_REGISTER_EVENTFD, &efd, 1) < 0) return errno;
  return 0;
}

// One completion from either engine: up to `room` (request, result) pairs, never blocking.
typedef struct {
  AioRequest *r;
  int64_t res;
} Done;

static long reap(AioEngine *e, Done *out, long room) {
  if (e->kind == ENGINE_LINUX_AIO) {
    struct io_event ev[64];
    if (room > 64) room = 64;
    struct timespec zero = {0, 0};
    long n;
    do n = sys_io_getevents(e->ctx, 0, room, ev, &zero);
    while (n < 0 && errno == EINTR);
    for (long i = 0; i < n; i++) {
      // obj is the iocb's address, inside its request.
      out[i].r = (AioRequest *)((char *)(uintptr_t)ev[i].obj - offsetof(AioRequest, cb));
      out[i].res = ev[i].res;
    }
    return n < 0 ? 0 : n;
  }
  Uring *q = &e->ring;
  uint32_t head = *q->cq_head;
  uint32_t tail = __atomic_load_n(q->cq_tail, __ATOMIC_ACQUIRE);
  long n = 0;
  while (head != tail && n < room) {
    struct io_uring_cqe *c = &q->cqes[head & q->cq_mask];
    out[n].r = (AioRequest *)(uintptr_t)c->user_data;
    out[n].res = c->res;
    n++;
    head++;
  }
  __atomic_store_n(q->cq_head, head, __ATOMIC_RELEASE);
  return n;
}

// Waits for every request still in the kernel (their memory is then ours
// again) and frees them: io_destroy does it for Linux AIO; for io_uring,
// whose close would not wait, io_uring_enter(GETEVENTS) until none is left.
static void drain_and_release(AioEngine *e) {
  if (e->kind == ENGINE_LINUX_AIO) {
    if (e->ctx) sys_io_destroy(e->ctx);
    e->ctx = 0;
  } else if (e->ring_fd >= 0) {
    Done done[64];
    while (e->inflight > 0 && e->ring.cqes) {
      long n = reap(e, done, 64);
      for (long i = 0; i < n; i++) {
        aio_unlink(e, done[i].r);
        e->inflight--;
      }
      if (n == 0 && sys_uring_enter(e->ring_fd, 0, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR) break;
    }
    uring_unmap(e);
    close(e->ring_fd);
    e->ring_fd = -1;
  }
  // Their events are gone (io_destroy) or reaped above.
  while (e->live) aio_unlink(e, e->live);
  e->inflight = 0;
}

static void aio_handle_closed(uv_handle_t *h) {
  AioEngine *e = h->data;
  e->handle_closed = 1;
  if (e->finalized) free(e);
}

static void aio_close_engine(AioEngine *e) {
  if (e->closed) return;
  e->closed = 1;
  drain_and_release(e);
  if (e->callback) napi_delete_reference(e->env, e->callback);
  e->callback = NULL;
  if (e->async) napi_async_destroy(e->env, e->async);
  e->async = NULL;
  if (e->polling) uv_poll_stop(&e->poll);
  e->polling = 0;
  close(e->efd);
  e->efd = -1;
  uv_close((uv_handle_t *)&e->poll, aio_handle_closed);
}

static void aio_on_ready(uv_poll_t *handle, int status, int events) {
  AioEngine *e = handle->data;
  if (e->closed) return;
  uint64_t count;
  // Non-blocking: EAGAIN when another round already reaped everything.
  if (read(e->efd, &count, sizeof count) < 0 && errno != EAGAIN) return;
  napi_env env = e->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value resource, fn;
  napi_callback_scope cscope = NULL;
  if (napi_create_object(env, &resource) == napi_ok) napi_open_callback_scope(env, resource, e->async, &cscope);
  Done done[64];
  for (;;) {
    if (e->closed || e->inflight == 0) break;
    long n = reap(e, done, 64);
    if (n <= 0) break;
    for (long i = 0; i < n && !e->closed; i++) {
      double tag = done[i].r->tag;
      aio_unlink(e, done[i].r);
      e->inflight--;
      if (e->callback == NULL || napi_get_reference_value(env, e->callback, &fn) != napi_ok) continue;
      napi_value argv[2], global, ignored;
      napi_get_global(env, &global);
      napi_create_double(env, tag, &argv[0]);
      napi_create_double(env, (double)done[i].res, &argv[1]);
      if (napi_call_function(env, global, fn, 2, argv, &ignored) == napi_pending_exception) {
        napi_value err;
        napi_get_and_clear_last_exception(env, &err);
        napi_fatal_exception(env, err);
      }
    }
    if (n < 64) break;
  }
  if (!e->closed && e->inflight == 0 && e->polling) {
    // Nothing outstanding: the loop may exit.
    uv_poll_stop(&e->poll);
    e->polling = 0;
  }
  if (cscope) napi_close_callback_scope(env, cscope);
  napi_close_handle_scope(env, scope);
}

static void aio_finalize(napi_env env, void *data, void *hint) {
  AioEngine *e = data;
  aio_close_engine(e);
  e->finalized = 1;
  if (e->handle_closed) free(e);
}

static AioEngine *engine_arg(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok) return NULL;
  return p;
}

// aioCreate(maxInFlight, onComplete(tag, result), kind = 0) -> engine handle;
// kind 0 is Linux AIO, 1 io_uring.
static napi_value aio_create(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t max, kind = ENGINE_LINUX_AIO;
  napi_valuetype t;
  if (argc < 2 || !get_i64(env, argv[0], &max) || max < 1 || max > 4096) CHECK(napi_invalid_arg);
  if (argc >= 3 && (!get_i64(env, argv[2], &kind) || (kind != ENGINE_LINUX_AIO && kind != ENGINE_IO_URING))) CHECK(napi_invalid_arg);
  CHECK(napi_typeof(env, argv[1], &t));
  if (t != napi_function) CHECK(napi_invalid_arg);
  uv_loop_t *loop;
  CHECK(napi_get_uv_event_loop(env, &loop));
  AioEngine *e = calloc(1, sizeof *e);
  if (!e) return throw_errno(env, "aioCreate", ENOMEM);
  e->env = env;
  e->kind = (int)kind;
  e->ring_fd = -1;
  e->max = (uint32_t)max;
  e->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (e->efd < 0) {
    int err = errno;
    free(e);
    return throw_errno(env, "eventfd", err);
  }
  int err = 0;
  const char *what = "io_setup";
  if (kind == ENGINE_LINUX_AIO) {
    if (sys_io_setup((unsigned)max, &e->ctx) < 0) err = errno;
  } else {
    what = "io_uring_setup";
    err = uring_open(e, (unsigned)max);
  }
  int r = err ? 0 : uv_poll_init(loop, &e->poll, e->efd);
  if (err || r != 0) {
    drain_and_release(e);
    close(e->efd);
    free(e);
    return err ? throw_errno(env, what, err) : throw_errno(env, "uv_poll_init", -r);
  }
  e->poll.data = e;
  napi_value name, handle;
  CHECK(napi_create_string_utf8(env, kind == ENGINE_LINUX_AIO ? "qemu-snap:linux-aio" : "qemu-snap:io_uring", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_async_init(env, NULL, name, &e->async));
  CHECK(napi_create_reference(env, argv[1], 1, &e->callback));
  CHECK(napi_create_external(env, e, aio_finalize, NULL, &handle));
  return handle;
}

// Hands one request to the kernel: 0 or an errno (the request is then not in it).
static int submit_one(AioEngine *e, AioRequest *r, int write, int fd, int64_t position, uint32_t nbuf) {
  if (e->kind == ENGINE_LINUX_AIO) {
    r->cb.aio_lio_opcode = write ? IOCB_CMD_PWRITEV : IOCB_CMD_PREADV;
    r->cb.aio_fildes = (uint32_t)fd;
    r->cb.aio_buf = (uint64_t)(uintptr_t)r->iov;
    r->cb.aio_nbytes = nbuf;
    r->cb.aio_offset = position;
    r->cb.aio_flags = IOCB_FLAG_RESFD;
    r->cb.aio_resfd = (uint32_t)e->efd;
    struct iocb *list[1] = {&r->cb};
    long n;
    do n = sys_io_submit(e->ctx, 1, list);
    while (n < 0 && errno == EINTR);
    return n == 1 ? 0 : n < 0 ? errno : EAGAIN;
  }
  Uring *q = &e->ring;
  // The only producer: no other thread moves the tail. At most max
  // (<= sq_entries) requests are in the kernel, so a slot is free.
  uint32_t tail = *q->tail;
  uint32_t idx = tail & q->mask;
  struct io_uring_sqe *s = &q->sqes[idx];
  memset(s, 0, sizeof *s);
  s->opcode = write ? IORING_OP_WRITEV : IORING_OP_READV;
  s->fd = fd;
  s->addr = (uint64_t)(uintptr_t)r->iov;
  s->len = nbuf;
  s->off = (uint64_t)position;
  s->user_data = (uint64_t)(uintptr_t)r;
  q->array[idx] = idx;
  __atomic_store_n(q->tail, tail + 1, __ATOMIC_RELEASE);
  long n;
  do n = sys_uring_enter(e->ring_fd, 1, 0, 0);
  while (n < 0 && errno == EINTR);
  if (n == 1) return 0;
  int err = n < 0 ? errno : EAGAIN;
  // Not consumed (no SQ polling thread here): take it back.
  if (__atomic_load_n(q->head, __ATOMIC_ACQUIRE) == tail) __atomic_store_n(q->tail, tail, __ATOMIC_RELEASE);
  return err;
}

// aioSubmit(engine, write, fd, position, buffers, tag) -> true when
// submitted, false when maxInFlight requests are already in the kernel.
// The buffers must stay alive and unchanged until the completion for `tag`.
static napi_value aio_submit(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  AioEngine *e;
  bool write;
  int64_t fd, position;
  double tag;
  uint32_t nbuf;
  if (argc < 6 || !(e = engine_arg(env, argv[0])) || napi_get_value_bool(env, argv[1], &write) != napi_ok || !get_i64(env, argv[2], &fd) ||
      !get_i64(env, argv[3], &position) || napi_get_array_length(env, argv[4], &nbuf) != napi_ok ||
      napi_get_value_double(env, argv[5], &tag) != napi_ok)
    CHECK(napi_invalid_arg);
  const char *what = e->kind == ENGINE_LINUX_AIO ? (write ? "io_submit(pwritev)" : "io_submit(preadv)") : (write ? "io_uring(writev)" : "io_uring(readv)");
  if (e->closed) return throw_errno(env, what, EBADF);
  if (nbuf == 0 || nbuf > 1024 || position < 0) return throw_errno(env, what, EINVAL);
  napi_value out;
  if (e->inflight >= e->max) {
    CHECK(napi_get_boolean(env, false, &out));
    return out;
  }
  AioRequest *r = calloc(1, sizeof *r + nbuf * sizeof(struct iovec));
  if (!r) return throw_errno(env, what, ENOMEM);
  for (uint32_t i = 0; i < nbuf; i++) {
    napi_value b;
    void *data;
    size_t len;
    if (napi_get_element(env, argv[4], i, &b) != napi_ok || napi_get_buffer_info(env, b, &data, &len) != napi_ok) {
      free(r);
      CHECK(napi_invalid_arg);
    }
    r->iov[i].iov_base = data;
    r->iov[i].iov_len = len;
  }
  r->tag = tag;
  int err = submit_one(e, r, write, (int)fd, position, nbuf);
  if (err != 0) {
    free(r);
    return throw_errno(env, what, err);
  }
  r->next = e->live;
  if (e->live) e->live->prev = r;
  e->live = r;
  e->submitted++;
  if (++e->inflight > e->peak) e->peak = e->inflight;
  if (!e->polling) {
    int pr = uv_poll_start(&e->poll, UV_READABLE, aio_on_ready);
    if (pr != 0) return throw_errno(env, "uv_poll_start", -pr);
    e->polling = 1;
  }
  CHECK(napi_get_boolean(env, true, &out));
  return out;
}

// aioStats(engine) -> [in flight now, most in flight at once, submitted in all]
static napi_value aio_stats(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  AioEngine *e;
  if (argc < 1 || !(e = engine_arg(env, argv[0]))) CHECK(napi_invalid_arg);
  napi_value out, a, b, c;
  CHECK(napi_create_array_with_length(env, 3, &out));
  CHECK(napi_create_uint32(env, e->inflight, &a));
  CHECK(napi_create_uint32(env, e->peak, &b));
  CHECK(napi_create_double(env, (double)e->submitted, &c));
  CHECK(napi_set_element(env, out, 0, a));
  CHECK(napi_set_element(env, out, 1, b));
  CHECK(napi_set_element(env, out, 2, c));
  return out;
}

// aioDestroy(engine): waits for requests still in the kernel, without
// calling back for them, and releases the context or ring and the eventfd.
static napi_value aio_destroy(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  AioEngine *e;
  if (argc < 1 || !(e = engine_arg(env, argv[0]))) CHECK(napi_invalid_arg);
  aio_close_engine(e);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"pipeSize", NULL, pipe_size, NULL, NULL, NULL, napi_default, NULL},
      {"mapFile", NULL, map_file, NULL, NULL, NULL, napi_default, NULL},
      {"dropPages", NULL, drop_pages, NULL, NULL, NULL, napi_default, NULL},
      {"writeSegments", NULL, write_segments, NULL, NULL, NULL, napi_default, NULL},
      {"xxh64Reset", NULL, xxh64_reset, NULL, NULL, NULL, napi_default, NULL},
      {"xxh64Update", NULL, xxh64_update, NULL, NULL, NULL, napi_default, NULL},
      {"xxh64Low", NULL, xxh64_low, NULL, NULL, NULL, napi_default, NULL},
      {"xxh64UpdateSegments", NULL, xxh64_update_segments, NULL, NULL, NULL, napi_default, NULL},
      {"copySegments", NULL, copy_segments, NULL, NULL, NULL, napi_default, NULL},
      {"pwriteSegments", NULL, pwrite_segments, NULL, NULL, NULL, napi_default, NULL},
      {"setNonBlocking", NULL, set_non_blocking, NULL, NULL, NULL, napi_default, NULL},
      {"exitNow", NULL, exit_now, NULL, NULL, NULL, napi_default, NULL},
      {"waitReadable", NULL, wait_readable, NULL, NULL, NULL, napi_default, NULL},
      {"linkFd", NULL, link_fd, NULL, NULL, NULL, napi_default, NULL},
      {"socketPair", NULL, socket_pair, NULL, NULL, NULL, napi_default, NULL},
      {"sendFd", NULL, send_fd, NULL, NULL, NULL, napi_default, NULL},
      {"alignedBuffer", NULL, aligned_buffer, NULL, NULL, NULL, napi_default, NULL},
      {"addressModulo", NULL, address_modulo, NULL, NULL, NULL, napi_default, NULL},
      {"dioAlign", NULL, dio_align, NULL, NULL, NULL, napi_default, NULL},
      {"aioCreate", NULL, aio_create, NULL, NULL, NULL, napi_default, NULL},
      {"aioSubmit", NULL, aio_submit, NULL, NULL, NULL, napi_default, NULL},
      {"aioStats", NULL, aio_stats, NULL, NULL, NULL, napi_default, NULL},
      {"aioDestroy", NULL, aio_destroy, NULL, NULL, NULL, napi_default, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) return NULL;
  napi_value n;
  if (napi_create_int32(env, XXH_STATE_BYTES, &n) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "xxh64StateBytes", n) != napi_ok) return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)

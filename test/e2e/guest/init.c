/*
 * The init of the e2e tests' Linux guest: a tiny static program that the
 * kernel runs from our initramfs. It dirties guest memory at a steady rate
 * and counts on the serial console, so that a live migration has pages that
 * change between passes (XBZRLE deltas, re-sent pages, write faults for
 * background-snapshot) and a restored guest shows it resumed where it was
 * saved. Its settings come from the kernel command line: the kernel hands
 * unknown key=value words to init as environment variables.
 *
 *   QS_DIRTY_MIB  size of the buffer it rewrites (default 16)
 *   QS_TICK_MS    pause between two ticks (default 100)
 *   QS_STRIDE     bytes between two writes in the buffer (default 4096: one
 *                 8-byte word per page, which XBZRLE encodes as a small delta)
 *
 * Each tick writes the tick number into every stride of the buffer, then
 * prints "qsnap-tick N". It never exits: init exiting panics the kernel.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long setting(const char *name, long fallback)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0')
        return fallback;
    return strtol(v, NULL, 0);
}

int main(void)
{
    long mib = setting("QS_DIRTY_MIB", 16);
    long tick_ms = setting("QS_TICK_MS", 100);
    long stride = setting("QS_STRIDE", 4096);
    size_t len = (size_t)mib << 20;
    if (stride < 8)
        stride = 8;
    volatile uint8_t *buf = malloc(len ? len : 1);
    if (buf == NULL) {
        printf("qsnap-guest: cannot allocate %ld MiB\n", mib);
        fflush(stdout);
        for (;;)
            pause();
    }
    /* Touch it all once so that the pages are really there (not zero pages). */
    memset((void *)buf, 0xa5, len);
    printf("qsnap-guest: ready, dirtying %ld MiB every %ld ms\n", mib, tick_ms);
    fflush(stdout);
    struct timespec pause_for = { tick_ms / 1000, (tick_ms % 1000) * 1000000L };
    for (uint64_t tick = 1;; tick++) {
        for (size_t off = 0; off + 8 <= len; off += (size_t)stride)
            *(volatile uint64_t *)(buf + off) = tick ^ ((uint64_t)off << 20);
        printf("qsnap-tick %llu\n", (unsigned long long)tick);
        fflush(stdout);
        if (tick_ms > 0)
            nanosleep(&pause_for, NULL);
    }
}

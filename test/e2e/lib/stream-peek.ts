// Throwaway inspection of captured migration streams for the e2e tests: just
// enough to count RAM records and find the trailer. Not the project's framer
// (src/migration/); it assumes a stream without configuration subsections
// and stops at the first device section.

export interface RamBlockInfo {
  id: string;
  length: number;
}

export interface StreamCommand {
  offset: number;
  cmd: number;
  payload: Buffer;
}

export interface StreamPeek {
  version: number;
  machine: string;
  commands: StreamCommand[];
  blocks: RamBlockInfo[];
  /** PAGE records (QEMU's ram.normal). */
  pages: number;
  /** ZERO records (QEMU's ram.duplicate). */
  zeros: number;
  /** Offset of the first non-RAM section or EOF token. */
  deviceStateOffset: number;
}

const PAGE = 4096;

/** Walk header, configuration, commands and the ram section of a captured precopy stream. */
export function peekStream(buf: Buffer): StreamPeek {
  let p = 0;
  const need = (n: number) => {
    if (p + n > buf.length) throw new Error(`stream truncated at offset ${p} (need ${n} bytes)`);
  };
  const u8 = () => (need(1), buf[p++]);
  const be16 = () => (need(2), (p += 2), buf.readUInt16BE(p - 2));
  const be32 = () => (need(4), (p += 4), buf.readUInt32BE(p - 4));
  const be64 = () => (need(8), (p += 8), buf.readBigUInt64BE(p - 8));
  const str = (n: number) => (need(n), (p += n), buf.toString('latin1', p - n, p));

  if (be32() !== 0x5145564d) throw new Error('not a QEVM stream');
  const out: StreamPeek = { version: be32(), machine: '', commands: [], blocks: [], pages: 0, zeros: 0, deviceStateOffset: -1 };
  let ramSection = -1;

  const ramRecords = () => {
    for (;;) {
      const at = p;
      const hdr = be64();
      const flags = Number(hdr & 0xfffn);
      const addr = hdr & ~0xfffn;
      if (flags & 0x10) return; // EOS
      if (flags & 0x04) {
        // MEM_SIZE: the address is the total; blocks follow until they add up.
        let left = Number(addr);
        while (left > 0) {
          const id = str(u8());
          const length = Number(be64());
          out.blocks.push({ id, length });
          left -= length;
        }
        continue;
      }
      if (flags & ~(0x02 | 0x08 | 0x20)) throw new Error(`unexpected RAM flags 0x${flags.toString(16)} at offset ${at}`);
      if (!(flags & 0x20)) str(u8());
      if (flags & 0x02) {
        u8();
        out.zeros++;
      } else if (flags & 0x08) {
        need(PAGE);
        p += PAGE;
        out.pages++;
      } else {
        throw new Error(`RAM record without PAGE or ZERO at offset ${at}`);
      }
    }
  };

  for (;;) {
    const at = p;
    const tok = u8();
    if (tok === 0x07) {
      out.machine = str(be32());
      if (buf[p] === 0x05) throw new Error(`configuration subsection at offset ${p}: not handled here`);
    } else if (tok === 0x08) {
      const cmd = be16();
      const len = be16();
      need(len);
      out.commands.push({ offset: at, cmd, payload: buf.subarray(p, p + len) });
      p += len;
    } else if (tok === 0x01) {
      const sid = be32();
      const id = str(u8());
      be32();
      be32();
      if (id !== 'ram') {
        out.deviceStateOffset = at;
        return out;
      }
      ramSection = sid;
      ramRecords();
      footer(sid);
    } else if (tok === 0x02 || tok === 0x03) {
      const sid = be32();
      if (sid !== ramSection) throw new Error(`section ${sid} at offset ${at} is not ram`);
      ramRecords();
      footer(sid);
    } else if (tok === 0x04 || tok === 0x00) {
      out.deviceStateOffset = at;
      return out;
    } else {
      throw new Error(`unexpected token 0x${tok.toString(16)} at offset ${at}`);
    }
  }

  function footer(sid: number) {
    const at = p;
    if (u8() !== 0x7e || be32() !== sid) throw new Error(`bad section footer at offset ${at}`);
  }
}

/**
 * If `buf` ends with EOF (0x00) + VMDESCRIPTION (0x06, be32 len, JSON), the
 * offset of that EOF byte; else -1. Only looks back `maxJson` bytes.
 */
export function findTrailer(buf: Buffer, maxJson = 4 << 20): number {
  if (buf.length < 7 || buf[buf.length - 1] !== 0x7d /* '}' */) return -1;
  const lo = Math.max(0, buf.length - maxJson - 6);
  for (let i = buf.length - 7; i >= lo; i--) {
    if (buf[i] === 0x00 && buf[i + 1] === 0x06 && buf[i + 6] === 0x7b /* '{' */ && buf.readUInt32BE(i + 2) === buf.length - i - 6) {
      return i;
    }
  }
  return -1;
}

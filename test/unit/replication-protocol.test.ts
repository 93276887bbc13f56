/**
 * The replication protocol's pieces, each on its own: the frame header and its CRCs
 * (every single flipped header bit is caught), the IO sub-header's checks, the control
 * payload readers, compression, the receiver's two-slot position file on real files,
 * the per-stream ordering (duplicates, epochs, failures, dropped owners) and the secret
 * file's checks. Seeded IO frames (feature 'entry-crc'): the payload CRC derived from the
 * log's CRC of the data, and the receiver's check of it.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DmError } from '../../src/core/errors.ts';
import { compress as zstdCompress } from '@mongodb-js/zstd';
import { compress, decompress } from '../../src/replication/compress.ts';
import { loadSecret } from '../../src/replication/handshake.ts';
import { PositionFile } from '../../src/replication/position.ts';
import {
  Codec, ENTRY_CRC, FEATURES, FLAG_NO_CRC, FLAG_SEEDED, FrameType, HEADER_SIZE, IO_FUA, IO_HEADER, IO_HEADER_SEEDED, IoOp, MAGIC,
  MAX_CONTROL, MAX_DATA, MAX_PAYLOAD, ProtocolError, bool, checkSeeded, decodeHeader, decodeIo, decodeJson, encodeHeader, encodeIo,
  encodeJson, hex, ioHeaderSize, payloadOk, seededCrc, str, uint,
  type IoRequest,
} from '../../src/replication/protocol.ts';
import { Stream } from '../../src/replication/stream.ts';
import { prng } from '../compliance/helpers.ts';

/** what `fn` throws (fails the test when it does not throw) */
function thrown(fn: () => unknown): Error {
  try {
    fn();
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a throw');
}

/** seeded pseudo-random bytes (n a multiple of 4), the same on every run */
const pseudoRandom = (n: number, seed: number): Buffer => prng(seed).fill(Buffer.alloc(n));

let tmp: string;
beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-replproto-'));
});
afterEach(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

// --- frame header ----------------------------------------------------------------------

describe('frame header', () => {
  const a = Buffer.from('hello ');
  const b = Buffer.from('world, this is a payload');

  it('lays out the documented fields and round-trips', () => {
    const h = encodeHeader(FrameType.IO, 123_456_789_012, [a, b]);
    expect(h.length).toBe(HEADER_SIZE);
    expect(h.readUInt32BE(0)).toBe(MAGIC);
    expect(h.toString('latin1', 0, 4)).toBe('DMKR');
    expect(h.readUInt8(4)).toBe(FrameType.IO);
    expect(h.readUInt8(5)).toBe(0);
    expect(h.readUInt16BE(6)).toBe(0);
    expect(h.readBigUInt64BE(8)).toBe(123_456_789_012n);
    expect(h.readUInt32BE(16)).toBe(a.length + b.length);
    expect(h.readUInt32BE(20)).toBe(crc32c(Buffer.concat([a, b])) >>> 0);
    expect(h.readUInt32BE(24)).toBe(crc32c(h.subarray(0, 24)) >>> 0);
    expect(h.readUInt32BE(28)).toBe(0);
    expect(decodeHeader(h)).toEqual({
      type: FrameType.IO, flags: 0, id: 123_456_789_012, length: a.length + b.length, crc: crc32c(Buffer.concat([a, b])) >>> 0,
    });
    // no payload at all
    expect(decodeHeader(encodeHeader(FrameType.PING, 0, []))).toEqual({ type: FrameType.PING, flags: 0, id: 0, length: 0, crc: 0 });
  });

  it('detects every single flipped bit of the 32-byte header', () => {
    const good = encodeHeader(FrameType.ACK, 0x0102030405, [a, b]);
    const missed: number[] = [];
    for (let bit = 0; bit < HEADER_SIZE * 8; bit++) {
      const h = Buffer.from(good);
      h[bit >> 3] ^= 1 << (bit & 7);
      let err: unknown = null;
      try {
        decodeHeader(h);
      } catch (e) {
        err = e;
      }
      if (!(err instanceof ProtocolError)) {
        missed.push(bit);
        continue;
      }
      expect(err.code).toBe('EPROTO');
      if (bit < 32) expect(err.message).toMatch(/bad frame magic/);
      else expect(err.message).toMatch(/frame header CRC mismatch|reserved/);
    }
    expect(missed).toEqual([]);
  });

  it('refuses a length over the limit, naming the limit', () => {
    const big = encodeHeader(FrameType.IO, 1, [Buffer.alloc(MAX_PAYLOAD + 1)]);
    const e1 = thrown(() => decodeHeader(big));
    expect(e1).toBeInstanceOf(ProtocolError);
    expect(e1.message).toContain(`${MAX_PAYLOAD + 1} bytes`);
    expect(e1.message).toContain(`limit of ${MAX_PAYLOAD}`);
    // exactly at the limit passes
    expect(decodeHeader(encodeHeader(FrameType.IO, 1, [Buffer.alloc(MAX_PAYLOAD)])).length).toBe(MAX_PAYLOAD);
    // the caller's limit (the handshake's)
    const ctl = encodeHeader(FrameType.HELLO, 0, [Buffer.alloc(MAX_CONTROL + 1)]);
    const e2 = thrown(() => decodeHeader(ctl, MAX_CONTROL));
    expect(e2).toBeInstanceOf(ProtocolError);
    expect(e2.message).toContain(`limit of ${MAX_CONTROL}`);
    // a header announcing 4 GiB - 1 with a good CRC
    const huge = Buffer.from(encodeHeader(FrameType.IO, 1, []));
    huge.writeUInt32BE(0xffffffff, 16);
    huge.writeUInt32BE(crc32c(huge.subarray(0, 24)) >>> 0, 24);
    expect(thrown(() => decodeHeader(huge)).message).toContain(`${0xffffffff} bytes is over the limit of ${MAX_PAYLOAD}`);
  });

  it('refuses an id beyond 2^53 (with a good CRC)', () => {
    const h = Buffer.from(encodeHeader(FrameType.ACK, 1, []));
    h.writeBigUInt64BE(1n << 60n, 8);
    h.writeUInt32BE(crc32c(h.subarray(0, 24)) >>> 0, 24);
    const e = thrown(() => decodeHeader(h));
    expect(e).toBeInstanceOf(ProtocolError);
    expect(e.message).toContain(`${1n << 60n}`);
  });

  it('payloadOk detects every flipped payload bit; FLAG_NO_CRC skips the check', () => {
    const payload = pseudoRandom(64, 7);
    const h = decodeHeader(encodeHeader(FrameType.IO, 9, [payload.subarray(0, 10), payload.subarray(10)]));
    expect(payloadOk(h, payload)).toBe(true);
    for (let bit = 0; bit < payload.length * 8; bit++) {
      const p = Buffer.from(payload);
      p[bit >> 3] ^= 1 << (bit & 7);
      expect(payloadOk(h, p)).toBe(false);
    }
    expect(payloadOk(h, payload.subarray(1))).toBe(false);

    const nh = encodeHeader(FrameType.IO, 9, [payload], true);
    expect(nh.readUInt8(5)).toBe(FLAG_NO_CRC);
    expect(nh.readUInt32BE(20)).toBe(0);
    const dh = decodeHeader(nh);
    expect(dh.flags).toBe(FLAG_NO_CRC);
    expect(dh.length).toBe(64);
    const flipped = Buffer.from(payload);
    flipped[5] ^= 0x10;
    expect(payloadOk(dh, flipped)).toBe(true);
    // the header itself is still checked without payload CRCs
    const bad = Buffer.from(nh);
    bad[16] ^= 1;
    expect(() => decodeHeader(bad)).toThrow(ProtocolError);
  });
});

// --- IO sub-header ---------------------------------------------------------------------

describe('IO frames', () => {
  const base: IoRequest = {
    handle: 7, op: IoOp.WRITE, flags: IO_FUA, codec: Codec.NONE, seq: 2 ** 40 + 3, epoch: 99, sector: 2 ** 33 + 1, sectors: 2, rawBytes: 1024,
  };
  const io = (r: Partial<IoRequest>, data: Buffer = Buffer.alloc(0)): Buffer => Buffer.concat([encodeIo({ ...base, ...r }), data]);
  const refused = (p: Buffer): string => {
    const e = thrown(() => decodeIo(p));
    expect(e).toBeInstanceOf(ProtocolError);
    return e.message;
  };

  it('round-trips every op', () => {
    const data = pseudoRandom(1024, 3);
    const p = io({}, data);
    expect(p.length).toBe(IO_HEADER + 1024);
    expect(decodeIo(p)).toEqual(base);
    // compressed writes carry fewer bytes than rawBytes
    expect(decodeIo(io({ codec: Codec.ZSTD }, data.subarray(0, 100)))).toEqual({ ...base, codec: Codec.ZSTD });
    expect(decodeIo(io({ codec: Codec.LZ4 }, data.subarray(0, 100)))).toEqual({ ...base, codec: Codec.LZ4 });
    for (const op of [IoOp.DISCARD, IoOp.WRITE_ZEROES, IoOp.FLUSH]) {
      const r = { ...base, op, rawBytes: 0, flags: 0, sectors: op === IoOp.FLUSH ? 0 : 8 };
      expect(decodeIo(encodeIo(r))).toEqual(r);
    }
    const rd = { ...base, op: IoOp.READ, rawBytes: 0, seq: 0, epoch: 0, sectors: MAX_DATA / 512 };
    expect(decodeIo(encodeIo(rd))).toEqual(rd);
  });

  it('refuses short payloads', () => {
    const p = io({}, Buffer.alloc(1024));
    expect(refused(p.subarray(0, IO_HEADER - 1))).toContain(`${IO_HEADER - 1} bytes is shorter`);
    expect(refused(Buffer.alloc(0))).toContain('shorter');
  });

  it('refuses unknown ops and codecs', () => {
    const p = io({}, Buffer.alloc(1024));
    p.writeUInt8(5, 4);
    expect(refused(p)).toContain('unknown op 5');
    const q = io({}, Buffer.alloc(1024));
    q.writeUInt8(3, 6);
    expect(refused(q)).toContain('unknown codec 3');
    q.writeUInt8(255, 6);
    expect(refused(q)).toContain('unknown codec 255');
  });

  it('refuses writes whose sizes disagree', () => {
    expect(refused(io({ rawBytes: 1000 }, Buffer.alloc(1000)))).toContain('write of 2 sectors says 1000 data bytes');
    expect(refused(io({ sectors: 3 }, Buffer.alloc(1024)))).toContain('write of 3 sectors says 1024');
    expect(refused(io({ sectors: 0, rawBytes: 0 }))).toContain('write of 0 sectors');
    const over = MAX_DATA / 512 + 1;
    expect(refused(io({ sectors: over, rawBytes: over * 512, codec: Codec.ZSTD }, Buffer.alloc(10)))).toContain(`write of ${over} sectors`);
    // uncompressed: the data must be exactly rawBytes
    expect(refused(io({}, Buffer.alloc(1023)))).toContain('write of 1024 bytes carries 1023');
    expect(refused(io({}, Buffer.alloc(1025)))).toContain('carries 1025');
    expect(refused(io({}))).toContain('carries 0');
  });

  it('refuses data (or a codec) on ops that carry none', () => {
    expect(refused(io({ op: IoOp.FLUSH, sectors: 0, rawBytes: 0 }, Buffer.alloc(512)))).toContain('op 3 carries 512 data bytes');
    expect(refused(io({ op: IoOp.READ, sectors: 1, rawBytes: 0 }, Buffer.alloc(1)))).toContain('op 4 carries 1 data bytes');
    expect(refused(io({ op: IoOp.DISCARD, sectors: 1, rawBytes: 0 }, Buffer.alloc(512)))).toContain('op 1 carries 512');
    expect(refused(io({ op: IoOp.FLUSH, sectors: 0, rawBytes: 0, codec: Codec.LZ4 }))).toContain('op 3 carries 0 data bytes');
  });

  it('refuses reads of 0 sectors or more than MAX_DATA', () => {
    expect(refused(io({ op: IoOp.READ, sectors: 0, rawBytes: 0 }))).toContain(`read of 0 sectors (expected 1 … ${MAX_DATA / 512})`);
    expect(refused(io({ op: IoOp.READ, sectors: MAX_DATA / 512 + 1, rawBytes: 0 }))).toContain(`read of ${MAX_DATA / 512 + 1} sectors`);
    expect(refused(io({ op: IoOp.READ, sectors: 0xffffffff, rawBytes: 0 }))).toContain(`read of ${0xffffffff} sectors`);
  });

  it('refuses 64-bit fields beyond 2^53', () => {
    for (const at of [8, 16, 24]) {
      const p = io({}, Buffer.alloc(1024));
      p.writeBigUInt64BE(1n << 63n, at);
      expect(refused(p)).toContain(`at byte ${at} is out of range`);
    }
  });
});

// --- seeded IO frames (feature 'entry-crc') ---------------------------------------------

describe('seeded IO frames', () => {
  const seed = 0x9e3779b9;
  const data = pseudoRandom(4096, 11);
  /** what the replication log sealed the entry with */
  const logged = { seed, crc: crc32c(data, seed) >>> 0 };
  const r: IoRequest = {
    handle: 3, op: IoOp.WRITE, flags: IO_FUA, codec: Codec.NONE, seq: 77, epoch: 5, sector: 2048, sectors: 8, rawBytes: 4096, seed,
  };
  /** a seeded frame as the sender builds it: header, sub-header, data (the data is never read for the CRC) */
  const frame = (): { h: ReturnType<typeof decodeHeader>; payload: Buffer } => {
    const sub = encodeIo(r);
    const h = decodeHeader(encodeHeader(FrameType.IO, 12, [sub, data], false, logged.crc));
    return { h, payload: Buffer.concat([sub, data]) };
  };

  it('is offered as a feature', () => {
    expect(ENTRY_CRC).toBe('entry-crc');
    expect(FEATURES).toContain(ENTRY_CRC);
  });

  it('encodes the seed after the 40 bytes, round-trips, and sets flag bit 1 with the derived CRC', () => {
    const sub = encodeIo(r);
    expect(sub.length).toBe(IO_HEADER_SEEDED);
    expect(ioHeaderSize(r)).toBe(44);
    expect(sub.readUInt32BE(40)).toBe(seed);
    // the first 40 bytes are those of the unseeded sub-header
    const { seed: _s, ...plain } = r;
    expect(sub.subarray(0, IO_HEADER).equals(encodeIo(plain))).toBe(true);
    expect(ioHeaderSize(plain)).toBe(IO_HEADER);
    expect(decodeIo(Buffer.concat([sub, data]), true)).toEqual(r);
    expect(decodeIo(Buffer.concat([encodeIo(plain), data]))).toEqual(plain);

    const { h, payload } = frame();
    expect(h.flags).toBe(FLAG_SEEDED);
    expect(h.length).toBe(IO_HEADER_SEEDED + data.length);
    // CRC field = crc32c(sub, crc32c(data, seed)): one pass over data ‖ sub, continuing from the seed
    expect(h.crc).toBe(crc32c(sub, crc32c(data, seed)) >>> 0);
    expect(h.crc).toBe(seededCrc(sub, logged.crc));
    expect(h.crc).toBe(crc32c(Buffer.concat([data, sub]), seed) >>> 0);
    expect(h.crc).not.toBe(crc32c(payload) >>> 0);
    // the header CRC covers the flag
    const raw = encodeHeader(FrameType.IO, 12, [sub, data], false, logged.crc);
    raw[5] = 0;
    expect(() => decodeHeader(raw)).toThrow(/frame header CRC mismatch/);
  });

  it('the sender derives the CRC from the log\'s, without reading the data', () => {
    const sub = encodeIo(r);
    const zeros = Buffer.alloc(data.length); // not the data: the header comes out the same
    expect(encodeHeader(FrameType.IO, 12, [sub, zeros], false, logged.crc).equals(encodeHeader(FrameType.IO, 12, [sub, data], false, logged.crc))).toBe(true);
    // only a seeded sub-header of an IO frame with a CRC
    expect(() => encodeHeader(FrameType.IO, 12, [encodeIo({ ...r, seed: undefined }), data], false, logged.crc)).toThrow(/seeded/);
    expect(() => encodeHeader(FrameType.IO, 12, [sub, data], true, logged.crc)).toThrow(/seeded/);
    expect(() => encodeHeader(FrameType.DATA, 12, [sub, data], false, logged.crc)).toThrow(/seeded/);
  });

  it('the receiver accepts a good one and rejects a flipped data byte, seed, or sub-header byte', () => {
    const { h, payload } = frame();
    expect(payloadOk(h, payload)).toBe(true);
    // every single flipped byte of the payload: data (from 44), seed (40-43), the rest of the sub-header
    for (let at = 0; at < payload.length; at++) {
      const p = Buffer.from(payload);
      p[at]! ^= 0x01;
      expect(payloadOk(h, p), `byte ${at}`).toBe(false);
    }
    const seedFlipped = Buffer.from(payload);
    seedFlipped.writeUInt32BE((seed ^ 0x80000000) >>> 0, 40);
    expect(payloadOk(h, seedFlipped)).toBe(false);
    // data that no longer matches what was logged (damaged at the sender after logging): the
    // sender sends the log's CRC, the receiver finds the mismatch
    const damaged = Buffer.from(data);
    damaged[100]! ^= 0x40;
    const sub = encodeIo(r);
    const hd = decodeHeader(encodeHeader(FrameType.IO, 13, [sub, damaged], false, logged.crc));
    expect(payloadOk(hd, Buffer.concat([sub, damaged]))).toBe(false);
    // read without the flag (a receiver ignoring it) the frame fails its CRC as well: never applied by mistake
    expect(payloadOk({ ...h, flags: 0 }, payload)).toBe(false);
  });

  it('refuses a malformed seeded header: no feature, another frame type, with NO_CRC, too short', () => {
    const { h } = frame();
    expect(() => checkSeeded(h, true)).not.toThrow();
    expect(() => checkSeeded({ ...h, flags: 0 }, false)).not.toThrow(); // an unseeded frame needs no feature
    const e1 = thrown(() => checkSeeded(h, false));
    expect(e1).toBeInstanceOf(ProtocolError);
    expect(e1.message).toBe('frame 12 (type 11) has flag bit 1 (seeded CRC) on a connection without the feature entry-crc');
    expect(thrown(() => checkSeeded({ ...h, type: FrameType.DIGEST }, true)).message).toContain('which only IO frames may carry');
    expect(thrown(() => checkSeeded({ ...h, flags: FLAG_SEEDED | FLAG_NO_CRC }, true)).message).toContain('and bit 0 (no CRC) together');
    const short = thrown(() => checkSeeded({ ...h, length: IO_HEADER }, true));
    expect(short).toBeInstanceOf(ProtocolError);
    expect(short.message).toBe('seeded IO frame 12 of 40 bytes is shorter than its 44-byte sub-header');
    expect(() => payloadOk({ ...h, length: 43 }, Buffer.alloc(43))).toThrow(ProtocolError);
  });

  it('decodeIo of a seeded frame: an uncompressed write only, the data exactly rawBytes after 44 bytes', () => {
    const refused = (p: Buffer): string => {
      const e = thrown(() => decodeIo(p, true));
      expect(e).toBeInstanceOf(ProtocolError);
      return e.message;
    };
    expect(refused(encodeIo({ ...r, seed: undefined }))).toBe('seeded IO frame of 40 bytes is shorter than its 44-byte header');
    expect(refused(Buffer.concat([encodeIo({ ...r, codec: Codec.ZSTD }), data.subarray(0, 100)]))).toContain('expected an uncompressed write');
    expect(refused(encodeIo({ ...r, op: IoOp.FLUSH, sectors: 0, rawBytes: 0 }))).toContain('op 3, codec 0 (expected an uncompressed write');
    expect(refused(Buffer.concat([encodeIo(r), data.subarray(4)]))).toContain('write of 4096 bytes carries 4092');
  });
});

// --- control payloads ------------------------------------------------------------------

describe('control payloads', () => {
  const j = (v: unknown): Buffer => encodeJson(v);
  const msg = (fn: () => unknown): string => {
    const e = thrown(fn);
    expect(e).toBeInstanceOf(ProtocolError);
    return e.message;
  };

  it('decodeJson accepts objects and refuses anything else, naming the frame', () => {
    expect(decodeJson(j({ a: 1, b: 'x' }), 'OPEN')).toEqual({ a: 1, b: 'x' });
    expect(msg(() => decodeJson(Buffer.from('{"a":'), 'OPEN'))).toBe('OPEN: payload is not JSON');
    expect(msg(() => decodeJson(Buffer.from([0xff, 0xfe, 0x00]), 'HELLO'))).toBe('HELLO: payload is not JSON');
    expect(msg(() => decodeJson(Buffer.alloc(0), 'CLOSE'))).toBe('CLOSE: payload is not JSON');
    for (const v of [[1, 2], null, 3, 'str', true]) expect(msg(() => decodeJson(j(v), 'OPEN'))).toBe('OPEN: payload is not an object');
    const big = Buffer.from(JSON.stringify({ pad: 'x'.repeat(MAX_CONTROL) }));
    expect(msg(() => decodeJson(big, 'AUTH_PROOF'))).toBe(`AUTH_PROOF: ${big.length} bytes is over the ${MAX_CONTROL}-byte limit for control frames`);
  });

  it('str/uint/bool/hex refuse missing and mistyped fields, naming them', () => {
    const o = {
      s: 'abc', n: 12, neg: -1, frac: 1.5, huge: 2 ** 53, ns: '12', b: true, h: 'ab'.repeat(4), H: 'AB'.repeat(4), g: 'zz'.repeat(4),
    } as Record<string, unknown>;
    expect(str(o, 's', 'OPEN')).toBe('abc');
    expect(msg(() => str(o, 'missing', 'OPEN'))).toBe("OPEN: 'missing' must be a string of at most 4096 characters");
    expect(msg(() => str(o, 'n', 'OPEN', 32))).toBe("OPEN: 'n' must be a string of at most 32 characters");
    expect(msg(() => str(o, 's', 'OPEN', 2))).toContain("'s' must be a string of at most 2 characters");
    expect(uint(o, 'n', 'CLOSE')).toBe(12);
    expect(uint({ z: 0 }, 'z', 'CLOSE')).toBe(0);
    for (const k of ['neg', 'frac', 'huge', 'ns', 'missing', 'b']) expect(msg(() => uint(o, k, 'CLOSE'))).toBe(`CLOSE: '${k}' must be an unsigned integer`);
    expect(bool(o, 'b', 'HELLO')).toBe(true);
    expect(msg(() => bool(o, 'n', 'HELLO'))).toBe("HELLO: 'n' must be true or false");
    expect(hex(o, 'h', 'AUTH', 4).equals(Buffer.from('abababab', 'hex'))).toBe(true);
    for (const [k, n] of [['H', 4], ['g', 4], ['h', 3], ['h', 5], ['n', 4], ['missing', 4]] as const) {
      expect(msg(() => hex(o, k, 'AUTH', n))).toBe(`AUTH: '${k}' must be ${n} bytes in lowercase hex`);
    }
  });
});

// --- compression -----------------------------------------------------------------------

describe('compression', () => {
  const text = Buffer.from('dmkit replicates blocks over tcp; '.repeat(2000)).subarray(0, 64 * 1024);

  it('zstd: a payload that could decode to far more than the frame says is refused before decoding', async () => {
    // what the sender makes passes, for every kind of data and size up to MAX_DATA
    for (const n of [4096, 1 << 20, 4 << 20]) {
      for (const data of [Buffer.alloc(n), randomBytes(n), Buffer.from('abc def '.repeat(n / 8))]) {
        const c = await zstdCompress(data, 3);
        expect((await decompress(Codec.ZSTD, c, n)).equals(data)).toBe(true);
      }
    }
    const small = await zstdCompress(Buffer.alloc(4096, 1), 3);
    const bomb = await zstdCompress(Buffer.alloc(64 << 20), 3); // 64 MiB of zeroes in a few KiB
    await expect(decompress(Codec.ZSTD, Buffer.concat([small, bomb]), 4096)).rejects.toThrow(/bytes after the frame \(one frame only\)/);
    await expect(decompress(Codec.ZSTD, bomb, 4 << 20)).rejects.toThrow(/more blocks than 4194304 bytes need/);
    await expect(decompress(Codec.ZSTD, Buffer.from('not zstd at all'), 4096)).rejects.toThrow(/not a zstd frame/);
    const truncated = small.subarray(0, small.length - 2);
    await expect(decompress(Codec.ZSTD, truncated, 4096)).rejects.toBeInstanceOf(ProtocolError);
  });

  for (const [name, codec] of [['zstd', Codec.ZSTD], ['lz4', Codec.LZ4]] as const) {
    it(`${name}: compressible data round-trips at a ratio over 2; random data stays raw`, async () => {
      const c = await compress(codec, text);
      expect(c).not.toBeNull();
      expect(text.length / c!.length).toBeGreaterThan(2);
      const back = await decompress(codec, c!, text.length);
      expect(back.equals(text)).toBe(true);

      expect(await compress(codec, randomBytes(64 * 1024))).toBeNull();
      expect(await compress(codec, Buffer.alloc(511))).toBeNull(); // too small to bother

      await expect(decompress(codec, c!, text.length - 512)).rejects.toBeInstanceOf(ProtocolError);
      await expect(decompress(codec, c!, text.length + 512)).rejects.toThrow(`${text.length} bytes, the frame says ${text.length + 512}`);
      await expect(decompress(codec, pseudoRandom(4096, 11), 65536)).rejects.toBeInstanceOf(ProtocolError);
      await expect(decompress(codec, Buffer.alloc(0), 512)).rejects.toBeInstanceOf(ProtocolError);
    });
  }

  it('lz4: a size prefix other than the frame\'s size is refused before anything is decoded', async () => {
    const data = Buffer.alloc(1024, 7);
    const c = (await compress(Codec.LZ4, data))!;
    expect(c.readUInt32LE(0)).toBe(1024); // lz4-napi's block format: the size first
    for (const lie of [0xfffffff0, 0x7fffffff, 4096, 0]) {
      const b = Buffer.from(c);
      b.writeUInt32LE(lie, 0);
      // decoding would still give 1024 bytes, but only after allocating what the prefix says
      await expect(decompress(Codec.LZ4, b, 1024)).rejects.toThrow(`lz4 payload says it holds ${lie} bytes, the frame says 1024`);
    }
    await expect(decompress(Codec.LZ4, c.subarray(0, 3), 1024)).rejects.toBeInstanceOf(ProtocolError);
    expect((await decompress(Codec.LZ4, c, 1024)).equals(data)).toBe(true);
  });

  it('codec none: never compresses, passes data through', async () => {
    expect(await compress(Codec.NONE, text)).toBeNull();
    const d = Buffer.from('abc');
    expect(await decompress(Codec.NONE, d, 3)).toBe(d);
  });
});

// --- position file ---------------------------------------------------------------------

describe('PositionFile', () => {
  const ID = '00112233445566778899aabbccddeeff';
  const OTHER = 'ffeeddccbbaa99887766554433221100';
  const file = (id = ID, slink = 1): string => path.join(tmp, 'pos', `${id}.${slink}.pos`);
  const open = (id = ID, slink = 1): PositionFile => PositionFile.open(path.join(tmp, 'pos'), id, slink);
  const read = (id = ID, slink = 1): [number, number] => {
    const p = open(id, slink);
    try {
      return [p.applied, p.epoch];
    } finally {
      p.close();
    }
  };

  it('a new file reads as applied 0, epoch 0, and is private', () => {
    const p = open();
    expect([p.applied, p.epoch]).toEqual([0, 0]);
    expect(p.path).toBe(file());
    expect(fs.statSync(file()).mode & 0o777).toBe(0o600);
    p.close();
    p.close(); // twice is harmless
    expect(read()).toEqual([0, 0]);
  });

  it('refuses a stream id that is not a 16-byte hex uuid', () => {
    const e = thrown(() => PositionFile.open(tmp, '../etc/passwd', 1)) as DmError;
    expect(e.code).toBe('EINVAL');
    expect(() => PositionFile.open(tmp, ID.toUpperCase(), 1)).toThrow(/not a 16-byte hex log uuid/);
  });

  it('reopens to the last record, written in alternate slots', () => {
    const p = open();
    p.record(5, 1);
    p.record(9, 2);
    p.record(9, 2); // unchanged: no write
    p.record(14, 3);
    expect([p.applied, p.epoch]).toEqual([14, 3]);
    p.close();
    expect(read()).toEqual([14, 3]);
    const b = fs.readFileSync(file());
    expect(b.length).toBe(1024);
    // generation 3 in slot 1, generation 2 in slot 0
    const slot = (i: number): [bigint, bigint, bigint] => [b.readBigUInt64BE(i * 512 + 8), b.readBigUInt64BE(i * 512 + 16), b.readBigUInt64BE(i * 512 + 24)];
    expect(slot(1)).toEqual([3n, 14n, 3n]);
    expect(slot(0)).toEqual([2n, 9n, 2n]);
    expect(b.toString('latin1', 0, 4)).toBe('DMKP');
    expect(b.subarray(48, 64).toString('hex')).toBe(ID);
    expect(b.subarray(64, 80).toString('hex')).toBe(fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim().replace(/-/g, ''));
    expect(b.readUInt32BE(80)).toBe(1);
  });

  it('after a reboot (another boot id in the record) only the durable position counts', () => {
    const p = open();
    p.record(5, 1);
    return p.sync().then(() => {
      p.record(9, 2); // in the page cache only: lost, or written before its data, by a power cut
      p.close();
      expect(read()).toEqual([9, 2]); // same boot: the page cache kept it
      const b = fs.readFileSync(file());
      const newest = b.readBigUInt64BE(8) > b.readBigUInt64BE(512 + 8) ? 0 : 1;
      b.fill(0xee, newest * 512 + 64, newest * 512 + 80); // as if written in an earlier boot
      b.writeUInt32BE(crc32c(b.subarray(newest * 512, newest * 512 + 84)) >>> 0, newest * 512 + 84);
      fs.writeFileSync(file(), b);
      expect(read()).toEqual([5, 1]);
    });
  });

  it('a corrupted or torn newest slot falls back to the older one', () => {
    const p = open();
    p.record(5, 1); // gen 1 → slot 1
    p.record(9, 2); // gen 2 → slot 0
    p.close();
    const good = fs.readFileSync(file());
    // one flipped bit anywhere in the record's 88 bytes of the newest slot
    for (const at of [0, 5, 9, 17, 25, 33, 41, 49, 65, 81, 85]) {
      const b = Buffer.from(good);
      b[at] ^= 0x04;
      fs.writeFileSync(file(), b);
      expect(read(), `byte ${at}`).toEqual([5, 1]);
    }
    // torn: the newest slot only half written (zeroes after byte 20)
    const torn = Buffer.from(good);
    torn.fill(0, 20, 512);
    fs.writeFileSync(file(), torn);
    expect(read()).toEqual([5, 1]);
    // the next record goes over the bad slot and wins
    const q = open();
    q.record(7, 3);
    q.close();
    expect(read()).toEqual([7, 3]);
    // both slots bad: nothing is trusted
    const both = Buffer.from(good);
    both[17] ^= 1;
    both[512 + 17] ^= 1;
    fs.writeFileSync(file(), both);
    expect(read()).toEqual([0, 0]);
    // the file cut short
    fs.writeFileSync(file(), good.subarray(0, 100));
    expect(read()).toEqual([9, 2]);
    fs.writeFileSync(file(), Buffer.alloc(0));
    expect(read()).toEqual([0, 0]);
  });

  it("another stream's file (uuid or slink) reads as 0", () => {
    const p = open();
    p.record(42, 4);
    p.close();
    const bytes = fs.readFileSync(file());
    fs.writeFileSync(file(OTHER, 1), bytes);
    fs.writeFileSync(file(ID, 2), bytes);
    expect(read(OTHER, 1)).toEqual([0, 0]);
    expect(read(ID, 2)).toEqual([0, 0]);
    expect(read(ID, 1)).toEqual([42, 4]);
  });
});

// --- stream ordering -------------------------------------------------------------------

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
  reject: (e: Error) => void;
}
function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (e: Error) => void;
  const promise = new Promise<void>((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}
/** let every pending promise callback run */
const settle = async (): Promise<void> => {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
};

describe('Stream', () => {
  const ID = 'aabbccddeeff00112233445566778899';
  const dir = (): string => path.join(tmp, 'streams');
  const onDisk = (): [number, number] => {
    const p = PositionFile.open(dir(), ID, 0);
    try {
      return [p.applied, p.epoch];
    } finally {
      p.close();
    }
  };
  let pos: PositionFile;
  let s: Stream;
  /** seqs in the order their apply functions started */
  let started: number[];
  let gates: Map<number, Deferred>;
  const A = { name: 'connection A' };
  const B = { name: 'connection B' };
  /** submit `seq` of `epoch`; its apply starts, records itself and waits for its gate */
  const submit = (seq: number, epoch: number, owner: object = A): Promise<'applied' | 'duplicate'> => {
    const g = deferred();
    gates.set(seq, g);
    return s.submit(owner, seq, epoch, () => {
      started.push(seq);
      return g.promise;
    });
  };
  /** record each outcome when it comes */
  const track = (p: Promise<unknown>): { v: unknown } => {
    const out: { v: unknown } = { v: 'pending' };
    p.then((v) => (out.v = v), (e: Error) => (out.v = e));
    return out;
  };

  beforeEach(() => {
    pos = PositionFile.open(dir(), ID, 0);
    s = new Stream(`${ID}.0`, pos);
    started = [];
    gates = new Map();
  });
  afterEach(() => pos.close());

  it('skips entries at or below the applied position without calling apply', async () => {
    pos.record(10, 3);
    s = new Stream(`${ID}.0`, pos);
    let calls = 0;
    const apply = async (): Promise<void> => { calls++; };
    expect(await s.submit(A, 7, 3, apply)).toBe('duplicate');
    expect(await s.submit(A, 10, 3, apply)).toBe('duplicate');
    expect(await s.submit(A, 1, 1, apply)).toBe('duplicate'); // even of an old epoch
    expect(calls).toBe(0);
    expect(s.duplicates).toBe(3);
    expect(await s.submit(A, 11, 3, apply)).toBe('applied');
    expect(calls).toBe(1);
    expect(s.duplicates).toBe(3);
  });

  it('runs one epoch at a time, advancing the position at each epoch change', async () => {
    const r1 = track(submit(1, 1));
    const r2 = track(submit(2, 1));
    const r3 = track(submit(3, 2));
    const r4 = track(submit(4, 2));
    const r5 = track(submit(5, 3));
    await settle();
    expect(started).toEqual([1, 2]); // epoch 1 runs concurrently; 2 and 3 wait
    expect(s.inflight).toBe(2);

    gates.get(2)!.resolve();
    await settle();
    expect(r2.v).toBe('applied');
    expect(started).toEqual([1, 2]); // 1 still in flight: epoch 2 must wait
    expect(onDisk()).toEqual([0, 1]); // epoch 1 began, nothing of it is applied for sure

    gates.get(1)!.resolve();
    await settle();
    expect(r1.v).toBe('applied');
    expect(started).toEqual([1, 2, 3, 4]);
    expect(onDisk()).toEqual([2, 2]); // epoch 1 done: its highest seq

    // a late entry of the running epoch joins it at once
    const r6 = track(submit(6, 2));
    await settle();
    expect(started).toEqual([1, 2, 3, 4, 6]);

    gates.get(3)!.resolve();
    gates.get(6)!.resolve();
    await settle();
    expect(started).toEqual([1, 2, 3, 4, 6]); // 4 holds epoch 3 back
    gates.get(4)!.resolve();
    await settle();
    expect([r3.v, r4.v, r6.v]).toEqual(['applied', 'applied', 'applied']);
    expect(started).toEqual([1, 2, 3, 4, 6, 5]);
    expect(onDisk()).toEqual([6, 3]);
    expect(r5.v).toBe('pending');
    gates.get(5)!.resolve();
    await settle();
    expect(r5.v).toBe('applied');

    // an entry of an epoch already finished is a protocol error
    const late = s.submit(A, 7, 2, async () => { started.push(7); });
    await expect(late).rejects.toBeInstanceOf(ProtocolError);
    await expect(late).rejects.toThrow('entry 7 of epoch 2 arrived after epoch 3 began');
    expect(started).not.toContain(7);
    expect(s.duplicates).toBe(0);
  });

  it('entries of later epochs start in epoch order, whatever their arrival order', async () => {
    track(submit(1, 1));
    const r4 = track(submit(4, 4));
    const r3 = track(submit(3, 3));
    const r2 = track(submit(2, 2));
    await settle();
    expect(started).toEqual([1]);
    gates.get(1)!.resolve();
    await settle();
    expect(started).toEqual([1, 2]);
    gates.get(2)!.resolve();
    await settle();
    expect(started).toEqual([1, 2, 3]);
    gates.get(3)!.resolve();
    await settle();
    expect(started).toEqual([1, 2, 3, 4]);
    gates.get(4)!.resolve();
    await settle();
    expect([r2.v, r3.v, r4.v]).toEqual(['applied', 'applied', 'applied']);
    expect(onDisk()).toEqual([3, 4]);
  });

  it('a failed apply keeps the position below the failed seq, and later epochs out until the sender starts over', async () => {
    const r1 = track(submit(1, 1));
    const r2 = track(submit(2, 1));
    const r3 = track(submit(3, 1));
    const r4 = track(submit(4, 2)); // pipelined: sent before the sender knew of 2's failure
    await settle();
    gates.get(1)!.resolve();
    gates.get(3)!.resolve();
    const boom = new DmError('EIO', 'disk on fire');
    gates.get(2)!.reject(boom);
    await settle();
    expect(r1.v).toBe('applied');
    expect(r2.v).toBe(boom);
    expect(r3.v).toBe('applied');
    expect((r4.v as DmError).code).toBe('EIO'); // never applied without entry 2
    expect(started).toEqual([1, 2, 3]);
    const r4b = track(submit(4, 2)); // nor when it arrives after the failure
    await settle();
    expect((r4b.v as DmError).code).toBe('EIO');
    expect(started).toEqual([1, 2, 3]);
    s.restart(4); // the sender gave entry 2 up (its dirty logs) and starts over
    const r4c = track(submit(4, 2));
    await settle();
    expect(started).toEqual([1, 2, 3, 4]);
    expect(onDisk()).toEqual([1, 2]); // epoch 2 began past the failed entry: only below it
    expect(pos.applied).toBe(1);
    gates.get(4)!.resolve();
    await settle();
    expect(r4c.v).toBe('applied');
    await s.sync();
    expect(onDisk()).toEqual([1, 2]); // a sync moves nothing: only an epoch's end (or a flush entry) does

    // epoch 3 begins (epoch 2 complete: position 4); the lowest failed seq of an epoch counts
    const r5 = track(submit(5, 3));
    const r6 = track(submit(6, 3));
    const r7 = track(submit(7, 3));
    await settle();
    expect(onDisk()).toEqual([4, 3]);
    gates.get(7)!.reject(new DmError('EIO', 'x'));
    gates.get(6)!.reject(new DmError('EIO', 'y'));
    gates.get(5)!.resolve();
    await settle();
    expect([r5.v, (r6.v as Error).message, (r7.v as Error).message]).toEqual(['applied', 'y', 'x']);
    s.restart(8);
    track(submit(8, 4));
    await settle();
    expect(onDisk()).toEqual([5, 4]);
    gates.get(8)!.resolve();
    await settle();
  });

  it('a sender without the feature pipeline (it drains each epoch) is not held back after a failure', async () => {
    const r1 = track(submit(1, 1));
    await settle();
    gates.get(1)!.reject(new DmError('EIO', 'x'));
    await settle();
    expect((r1.v as Error).message).toBe('x');
    // its next epoch comes only once it dealt with the failure (S2 without pipelining)
    const r2 = track(s.submit(A, 2, 2, async () => { started.push(2); }, false));
    await settle();
    expect(r2.v).toBe('applied');
    expect(started).toEqual([1, 2]);
    expect(onDisk()).toEqual([0, 2]); // the failed entry holds the position below it
    expect(s.restarts).toBe(0);
  });

  it('a failed entry applied again (re-sent in its epoch) no longer holds the position back', async () => {
    const r1 = track(submit(1, 1));
    const r2 = track(submit(2, 1));
    await settle();
    gates.get(1)!.reject(new DmError('EIO', 'transient'));
    gates.get(2)!.resolve();
    await settle();
    expect((r1.v as Error).message).toBe('transient');
    expect(r2.v).toBe('applied');
    const again = track(submit(1, 1)); // the sender re-sends it: same epoch, above the position
    await settle();
    gates.get(1)!.resolve();
    await settle();
    expect(again.v).toBe('applied');
    track(submit(3, 2));
    await settle();
    expect(onDisk()).toEqual([2, 2]);
  });

  it("drop(owner) rejects only that owner's waiting entries", async () => {
    const r1 = track(submit(1, 1, A));
    const ra = track(submit(2, 2, A));
    const rb = track(submit(3, 2, B));
    const ra2 = track(submit(4, 3, A));
    await settle();
    const gone = new DmError('ECONNRESET', 'connection A went away');
    s.drop(A, gone);
    await settle();
    expect(ra.v).toBe(gone);
    expect(ra2.v).toBe(gone);
    expect(rb.v).toBe('pending');
    expect(r1.v).toBe('pending'); // in flight: not dropped, it finishes
    gates.get(1)!.resolve();
    await settle();
    expect(r1.v).toBe('applied');
    expect(started).toEqual([1, 3]); // A's waiting entries never ran
    gates.get(3)!.resolve();
    await settle();
    expect(rb.v).toBe('applied');
    track(submit(5, 3, B));
    await settle();
    expect(onDisk()).toEqual([3, 3]);
  });

  it('flushedEntry() records a flush entry only when idle (and not past a failure); idle() waits for writes', async () => {
    track(submit(1, 1));
    track(submit(2, 1));
    track(submit(3, 1));
    await settle();
    let idle = false;
    void s.idle().then(() => (idle = true));
    s.flushedEntry(4, 2); // in flight: nothing recorded
    expect(onDisk()).toEqual([0, 1]);
    gates.get(1)!.resolve();
    gates.get(3)!.resolve();
    await settle();
    expect(idle).toBe(false);
    s.flushedEntry(4, 2); // 2 still in flight
    expect(onDisk()).toEqual([0, 1]);
    gates.get(2)!.resolve();
    await settle();
    expect(idle).toBe(true);
    s.flushedEntry(4, 2);
    expect(onDisk()).toEqual([4, 2]);
    // duplicates now
    let calls = 0;
    expect(await s.submit(A, 2, 1, async () => { calls++; })).toBe('duplicate');
    expect(calls).toBe(0);
  });

  it('a new Stream over the same file resumes where the last one stopped', async () => {
    track(submit(1, 1));
    track(submit(2, 2));
    gates.get(1)!.resolve();
    await settle();
    gates.get(2)!.resolve();
    await settle();
    s.flushedEntry(3, 3);
    pos.close();
    pos = PositionFile.open(dir(), ID, 0);
    s = new Stream(`${ID}.0`, pos);
    let calls = 0;
    const apply = async (): Promise<void> => { calls++; };
    expect(await s.submit(A, 2, 2, apply)).toBe('duplicate');
    expect(await s.submit(A, 3, 3, apply)).toBe('duplicate');
    await expect(s.submit(A, 4, 2, apply)).rejects.toBeInstanceOf(ProtocolError);
    expect(await s.submit(A, 4, 3, apply)).toBe('applied');
    expect(calls).toBe(1);
  });
});

// --- secret files ----------------------------------------------------------------------

describe('loadSecret', () => {
  const SECRET = 'correct horse battery staple';

  it('refuses a file group or others may read, naming it and saying chmod 600', () => {
    const f = path.join(tmp, 'secret');
    fs.writeFileSync(f, SECRET, { mode: 0o600 });
    for (const mode of [0o644, 0o640, 0o604, 0o620, 0o602, 0o660]) {
      fs.chmodSync(f, mode);
      const e = thrown(() => loadSecret(f)) as DmError;
      expect(e).toBeInstanceOf(DmError);
      expect(e.code).toBe('EACCES');
      expect(e.message).toContain(f);
      expect(e.message).toContain('chmod 600');
      expect(e.message).toContain(mode.toString(8));
    }
  });

  it('refuses a short secret (after trimming)', () => {
    const f = path.join(tmp, 'short');
    fs.writeFileSync(f, '  0123456789abcde \n', { mode: 0o600 }); // 15 bytes trimmed
    const e = thrown(() => loadSecret(f)) as DmError;
    expect(e.code).toBe('EINVAL');
    expect(e.message).toContain(f);
    expect(e.message).toContain('15 bytes');
    expect(e.message).toContain('at least 16');
  });

  it('refuses a missing file with ENOENT and a directory with EINVAL', () => {
    const f = path.join(tmp, 'nope');
    const e = thrown(() => loadSecret(f)) as DmError;
    expect(e.code).toBe('ENOENT');
    expect(e.message).toContain(f);
    const d = path.join(tmp, 'dir');
    fs.mkdirSync(d, { mode: 0o700 });
    expect((thrown(() => loadSecret(d)) as DmError).code).toBe('EINVAL');
  });

  it('accepts a 0600 file and trims it', () => {
    const f = path.join(tmp, 'ok');
    fs.writeFileSync(f, `${SECRET}\n`, { mode: 0o600 });
    const s = loadSecret(f);
    expect(s.file).toBe(f);
    expect(s.key.equals(Buffer.from(SECRET))).toBe(true);
    fs.chmodSync(f, 0o400);
    expect(loadSecret(f).key.toString()).toBe(SECRET);
  });
});

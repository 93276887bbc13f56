/**
 * The `ringbuffer` log's byte format (docs/formats/replog.md), checked against bytes built
 * here from the documented layout, independently of the codec; then the codec's round
 * trips, and that every CRC catches a flipped byte (header, checkpoint, entry header, entry
 * payload) and the magic and version checks say which is which.
 */
import { crc32c } from '@node-rs/crc32';
import { describe, expect, it } from 'vitest';
import {
  CHECKPOINT_SECTOR, DATA_SECTOR, ENTRY_HEADER_BYTES, HEADER_BYTES, MAX_SLINKS, MIN_LOG_SECTORS, SLOT_BYTES,
  decodeCheckpoint, decodeEntryHeader, decodeHeader, encodeCheckpoint, encodeEntryHeader, encodeHeader, encodeWrapMarker,
  entryBytes, entryCrc, getU64, initialCheckpoint, newHeader, putU64, sealEntry,
} from '../../src/replog/ring-format.ts';
import type { Checkpoint, EntryFields } from '../../src/replog/ring-format.ts';
import { RingSpace, maxEntryBytes } from '../../src/replog/ring-space.ts';

const UUID = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
const OTHER = Buffer.from('ffeeddccbbaa99887766554433221100', 'hex');

const u64 = (b: Buffer, at: number): number => b.readUInt32LE(at) + b.readUInt32LE(at + 4) * 2 ** 32;

describe('ringbuffer format: log header', () => {
  it('lays the header out as documented, CRC32C over bytes 0-4091 at 4092', () => {
    const b = encodeHeader(newHeader(UUID, 123456, 1_700_000_000_123));
    expect(b.length).toBe(4096);
    expect(b.toString('latin1', 0, 8)).toBe('DMKRLOG\0');
    expect([b.readUInt32LE(8), b.readUInt32LE(12)]).toEqual([1, 4096]);
    expect(b.subarray(16, 32).equals(UUID)).toBe(true);
    expect([u64(b, 32), u64(b, 40), u64(b, 48), b.readUInt32LE(56), b.readUInt32LE(60), u64(b, 64)])
      .toEqual([123456, 24, 8, 8, 2, 1_700_000_000_123]);
    expect(b.subarray(72, 4092).every((x) => x === 0)).toBe(true);
    expect(b.readUInt32LE(4092)).toBe(crc32c(b.subarray(0, 4092)));
    expect([CHECKPOINT_SECTOR, DATA_SECTOR, HEADER_BYTES, SLOT_BYTES, MIN_LOG_SECTORS]).toEqual([8, 24, 4096, 4096, 4096]);
  });

  it('round-trips', () => {
    const h = newHeader(UUID, MIN_LOG_SECTORS * 3, 42);
    expect(decodeHeader(encodeHeader(h))).toEqual({ kind: 'ok', header: h });
  });

  it('tells an empty place, foreign data, another version, a corrupted and an invalid header apart', () => {
    const good = encodeHeader(newHeader(UUID, MIN_LOG_SECTORS, 1));
    expect(decodeHeader(Buffer.alloc(4096))).toEqual({ kind: 'empty' });
    const foreign = Buffer.alloc(4096);
    foreign.write('XFSB', 0, 'latin1');
    expect(decodeHeader(foreign)).toEqual({ kind: 'foreign', magic: Buffer.from('5846534200000000', 'hex') });
    const v2 = Buffer.from(good);
    v2.writeUInt32LE(2, 8);
    expect(decodeHeader(v2)).toEqual({ kind: 'version', version: 2 }); // whatever its CRC
    for (const at of [12, 16, 31, 32, 40, 60, 64, 100, 4091, 4092, 4095]) {
      const flipped = Buffer.from(good);
      flipped[at]! ^= 0x10;
      expect(decodeHeader(flipped).kind, `byte ${at}`).toBe('crc');
    }
    const small = Buffer.from(good);
    putU64(small, 32, 100);
    small.writeUInt32LE(crc32c(small.subarray(0, 4092)), 4092);
    expect(decodeHeader(small)).toEqual({ kind: 'invalid', why: 'size 100 below 4096 sectors' });
  });
});

describe('ringbuffer format: checkpoints', () => {
  const cp: Checkpoint = {
    generation: 77, initial: false, tailSeq: 1_000_001, tailOffset: 512 * 999, tailPrevCrc: 0xdeadbeef, time: 1_700_000_000_000,
    state: {
      localDone: 1_000_050,
      slinks: Array.from({ length: MAX_SLINKS }, (_, i) => ({ slink: i, seq: 1_000_000 + i, mode: i % 3 ? 'ship' as const : 'log' as const })),
    },
  };

  it('lays a slot out as documented and round-trips 64 slinks', () => {
    const b = encodeCheckpoint(cp, UUID);
    expect(b.length).toBe(4096);
    expect(b.toString('latin1', 0, 8)).toBe('DMKRCKP\0');
    expect([b.readUInt32LE(8), b.readUInt32LE(12), u64(b, 32), u64(b, 40), u64(b, 48), u64(b, 56), b.readUInt32LE(64), u64(b, 72)])
      .toEqual([0, 64, 77, 1_000_050, 1_000_001, 512 * 999, 0xdeadbeef, 1_700_000_000_000]);
    expect(b.subarray(16, 32).equals(UUID)).toBe(true);
    expect([b.readUInt32LE(80 + 16 * 5), b[80 + 16 * 5 + 4], u64(b, 80 + 16 * 5 + 8)]).toEqual([5, 0, 1_000_005]);
    expect(b[80 + 16 * 6 + 4]).toBe(1); // slink 6: log
    expect(b.readUInt32LE(4092)).toBe(crc32c(b.subarray(0, 4092)));
    expect(decodeCheckpoint(b, UUID)).toEqual(cp);
    const first = initialCheckpoint(5);
    expect(decodeCheckpoint(encodeCheckpoint(first, UUID), UUID)).toEqual(first);
    expect(encodeCheckpoint(first, UUID).readUInt32LE(8)).toBe(1); // the initial flag
  });

  it('keeps the replicator\'s epoch counter, the slinks to verify, the boot id, quiesced, the devices, those that left and those forgotten at bytes 3072 … 4091; zeroes read as none', () => {
    const boot = '0123456789abcdef0123456789abcdef';
    const withMore: Checkpoint = { ...cp, state: { ...cp.state, epoch: 1_765_000_000_123_456, verify: [0, 9, 63], boot, quiesced: true, devices: [0, 1, 255], left: [{ dev: 2, seq: 77 }, { dev: 254, seq: 2 ** 40 + 5 }], forgotten: [3] } };
    const b = encodeCheckpoint(withMore, UUID);
    expect(u64(b, 3072)).toBe(1_765_000_000_123_456);
    expect([...b.subarray(3080, 3088)]).toEqual([0x01, 0x02, 0, 0, 0, 0, 0, 0x80]);
    expect([b.toString('hex', 3088, 3104), b[3104]]).toEqual([boot, 1]);
    expect([b[3112], b[3143]]).toEqual([0x03, 0x80]); // devices 0, 1 and 255
    expect(b[3144]).toBe(0x08); // forgotten 3
    expect([b.readUInt32LE(3176), b.readUInt32LE(3184), u64(b, 3188), b.readUInt32LE(3196), u64(b, 3200)]).toEqual([2, 2, 77, 254, 2 ** 40 + 5]); // left: 2 at 77, 254 at 2^40 + 5
    expect(decodeCheckpoint(b, UUID)).toEqual(withMore);
    const plain = encodeCheckpoint(cp, UUID);
    expect(plain.subarray(3072, 4092).every((x) => x === 0)).toBe(true);
    expect(decodeCheckpoint(plain, UUID)!.state).toEqual(cp.state); // no epoch, no verify: as an older log
  });

  it('keeps the activity log at bytes 1104 … 3071: count, flags (kept, incomplete), u32 keys; none kept reads as absent, kept and empty as kept', () => {
    const keys = [0, 5, 255 * 2 ** 24 + 0xffffff];
    const withAl: Checkpoint = { ...cp, state: { ...cp.state, activity: { extents: keys, incomplete: false } } };
    const b = encodeCheckpoint(withAl, UUID);
    expect([b.readUInt32LE(1104), b[1108], b.readUInt32LE(1112), b.readUInt32LE(1116), b.readUInt32LE(1120)]).toEqual([3, 1, 0, 5, 0xffffffff]);
    expect(decodeCheckpoint(b, UUID)).toEqual(withAl);
    const incomplete: Checkpoint = { ...cp, state: { ...cp.state, activity: { extents: [], incomplete: true } } };
    const bi = encodeCheckpoint(incomplete, UUID);
    expect([bi.readUInt32LE(1104), bi[1108]]).toEqual([0, 3]);
    expect(decodeCheckpoint(bi, UUID)).toEqual(incomplete);
    const empty: Checkpoint = { ...cp, state: { ...cp.state, activity: { extents: [], incomplete: false } } };
    expect(decodeCheckpoint(encodeCheckpoint(empty, UUID), UUID)!.state.activity).toEqual({ extents: [], incomplete: false });
    expect(decodeCheckpoint(encodeCheckpoint(cp, UUID), UUID)!.state.activity).toBeUndefined(); // an older log: none kept
    const full = Array.from({ length: 490 }, (_, i) => i);
    const bf = encodeCheckpoint({ ...cp, state: { ...cp.state, activity: { extents: full, incomplete: false } } }, UUID);
    expect(bf.readUInt32LE(3068)).toBe(489); // the last key ends where the epoch begins
    expect(() => encodeCheckpoint({ ...cp, state: { ...cp.state, activity: { extents: [...full, 490], incomplete: false } } }, UUID)).toThrow(RangeError);
    // impossible counts and flags are refused even with a matching CRC
    for (const [at, value] of [[1104, 491], [1108, 4]] as const) {
      const bad = Buffer.from(b);
      bad.writeUInt32LE(value, at);
      if (at === 1108) bad.writeUInt32LE(value, at);
      bad.writeUInt32LE(crc32c(bad.subarray(0, 4092)), 4092);
      expect(decodeCheckpoint(bad, UUID), `${at}=${value}`).toBeNull();
    }
    const keysWithoutKept = encodeCheckpoint(cp, UUID);
    keysWithoutKept.writeUInt32LE(2, 1104);
    keysWithoutKept.writeUInt32LE(crc32c(keysWithoutKept.subarray(0, 4092)), 4092);
    expect(decodeCheckpoint(keysWithoutKept, UUID)).toBeNull();
  });

  it('refuses a flipped byte, an empty slot, another log\'s slot and too many slinks', () => {
    const b = encodeCheckpoint(cp, UUID);
    for (const at of [0, 9, 20, 33, 50, 64, 90, 1103, 2000, 4093]) {
      const flipped = Buffer.from(b);
      flipped[at]! ^= 1;
      expect(decodeCheckpoint(flipped, UUID), `byte ${at}`).toBeNull();
    }
    expect(decodeCheckpoint(Buffer.alloc(4096), UUID)).toBeNull();
    expect(decodeCheckpoint(b, OTHER)).toBeNull();
    const tooMany = { ...cp, state: { localDone: 0, slinks: [...cp.state.slinks, { slink: 99, seq: 0, mode: 'ship' as const }] } };
    expect(() => encodeCheckpoint(tooMany, UUID)).toThrow(RangeError);
  });
});

describe('ringbuffer format: entries', () => {
  const fields: EntryFields = {
    op: 'write', fua: true, devNr: 200, payloadBytes: 1024, seq: 2 ** 40 + 3, epoch: 9, sector: 2 ** 35 + 1, sectors: 2,
    time: 1_700_000_000_456, prevCrc: 0x12345678,
  };
  const payload = Buffer.alloc(1024);
  for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;

  /** header + payload in one image, sealed */
  function image(): Buffer {
    const b = Buffer.alloc(entryBytes(payload.length));
    encodeEntryHeader(b, fields, UUID);
    payload.copy(b, ENTRY_HEADER_BYTES);
    sealEntry(b, 0, null);
    return b;
  }

  it('lays a header out as documented; the CRC covers bytes 8-511 and the payload', () => {
    const b = image();
    expect(b.length).toBe(1536);
    expect(b.toString('latin1', 0, 4)).toBe('DMKE');
    expect([b[8], b[9], b[10], b[11], b.readUInt32LE(12)]).toEqual([1, 1, 1, 200, 1024]);
    expect(b.subarray(16, 32).equals(UUID)).toBe(true);
    expect([u64(b, 32), u64(b, 40), u64(b, 48), u64(b, 56), u64(b, 64), b.readUInt32LE(72)])
      .toEqual([2 ** 40 + 3, 9, 2 ** 35 + 1, 2, 1_700_000_000_456, 0x12345678]);
    expect(b.subarray(76, 512).every((x) => x === 0)).toBe(true);
    expect(b.readUInt32LE(4)).toBe(crc32c(b.subarray(8, 1536)));
    // the same CRC when the payload is a separate buffer (entries written in two pieces)
    const header = Buffer.alloc(512);
    encodeEntryHeader(header, fields, UUID);
    expect(sealEntry(header, 0, payload)).toBe(b.readUInt32LE(4));
  });

  it('round-trips every op', () => {
    for (const [op, code] of [['write', 1], ['discard', 2], ['write-zeroes', 3], ['flush', 4]] as const) {
      const payloadBytes = op === 'write' ? 1024 : 0;
      const b = Buffer.alloc(512 + payloadBytes);
      encodeEntryHeader(b, { ...fields, op, fua: false, payloadBytes }, UUID);
      const crc = sealEntry(b, 0, null);
      expect(b[9]).toBe(code);
      expect(decodeEntryHeader(b, 0, UUID)).toEqual({ ...fields, op, fua: false, payloadBytes, kind: 'entry', crc });
    }
  });

  it('refuses a header whose payload length is not what append makes (before anything reads the payload)', () => {
    for (const [op, payloadBytes] of [['write', 0xffffffff], ['write', 512], ['write', 0], ['flush', 512], ['discard', 1024]] as const) {
      const b = Buffer.alloc(512);
      encodeEntryHeader(b, { ...fields, op, payloadBytes }, UUID);
      sealEntry(b, 0, null);
      expect(decodeEntryHeader(b, 0, UUID), `${op} with ${payloadBytes} payload bytes`).toBeNull();
    }
  });

  it('catches a flipped byte in the header fields and in the payload', () => {
    const good = image();
    const crc = good.readUInt32LE(4);
    for (const at of [8, 9, 11, 12, 33, 41, 49, 57, 65, 73, 300, 511, 512, 1000, 1535]) {
      const b = Buffer.from(good);
      b[at]! ^= 0x04;
      const h = decodeEntryHeader(b, 0, UUID);
      // either no longer a header of this log (kind, op), or its CRC no longer matches
      expect(h === null || entryCrc(b, 0, null) !== crc, `byte ${at}`).toBe(true);
    }
    const magic = Buffer.from(good);
    magic[1]! ^= 1;
    expect(decodeEntryHeader(magic, 0, UUID)).toBeNull();
    expect(decodeEntryHeader(good, 0, OTHER)).toBeNull();
    expect(decodeEntryHeader(Buffer.alloc(512), 0, UUID)).toBeNull();
    const badOp = Buffer.from(good);
    badOp[9] = 9;
    expect(decodeEntryHeader(badOp, 0, UUID)).toBeNull();
  });

  it('encodes wrap markers: kind 2, the next entry\'s seq, no payload', () => {
    const m = encodeWrapMarker(41, UUID);
    expect([m.length, m.toString('latin1', 0, 4), m[8], u64(m, 32), m.readUInt32LE(12)]).toEqual([512, 'DMKE', 2, 41, 0]);
    expect(m.readUInt32LE(4)).toBe(crc32c(m.subarray(8, 512)));
    expect(decodeEntryHeader(m, 0, UUID)).toEqual({ kind: 'wrap', seq: 41, payloadBytes: 0, crc: m.readUInt32LE(4) });
  });

  it('pads payloads to 512 bytes and reads u64s up to 2^53 - 1', () => {
    expect([entryBytes(0), entryBytes(1), entryBytes(512), entryBytes(513)]).toEqual([512, 1024, 1024, 1536]);
    const b = Buffer.alloc(8);
    putU64(b, 0, Number.MAX_SAFE_INTEGER);
    expect(getU64(b, 0)).toBe(Number.MAX_SAFE_INTEGER);
    b.writeUInt32LE(0x200000, 4);
    expect(getU64(b, 0)).toBe(-1);
  });
});

describe('ringbuffer ring space', () => {
  const RING = 64 * 1024;

  it('takes space at the head, wraps with a marker, and frees up to the tail', () => {
    const s = new RingSpace(RING, 0, 0, 0);
    expect(s.maxEntryBytes).toBe(maxEntryBytes(RING));
    expect(s.maxEntryBytes).toBe(32 * 1024 - 512);
    expect([s.take(16384), s.take(16384), s.take(16384), s.marker]).toEqual([0, 16384, 32768, -1]);
    expect(s.take(20480)).toBe(-1); // would wrap: 16 KiB to the end + 20 KiB > 16 KiB free
    s.release(32768, false);
    expect([s.usedBytes, s.isLinear()]).toEqual([16384, true]);
    expect(s.take(20480)).toBe(0); // 49152 + 20480 > 65024: marker at 49152, entry at 0
    expect([s.marker, s.usedBytes, s.headOffset, s.isLinear()]).toEqual([49152, 16384 + 16384 + 20480, 20480, false]);
    expect(s.take(12288)).toBe(20480); // up to the tail exactly: the ring is full
    expect([s.freeBytes, s.take(512)]).toEqual([0, -1]);
    s.release(49152, false); // the tail passes the entry at 32768: now at the marker
    expect(s.usedBytes).toBe(16384 + 20480 + 12288);
    s.release(0, false); // past the marker: the wrap waste is free
    expect(s.usedBytes).toBe(20480 + 12288);
    s.release(0, true);
    expect([s.usedBytes, s.tailOffset, s.headOffset, s.freeBytes]).toEqual([0, 32768, 32768, RING]);
  });

  it('never lets an entry end in the last sector, so a marker always fits at the head', () => {
    for (let head = 0; head <= RING - 512; head += 512) {
      const t = new RingSpace(RING, head, head, 0);
      const at = t.take(t.maxEntryBytes); // always fits in an empty ring
      expect(at, `head ${head}`).toBeGreaterThanOrEqual(0);
      expect(t.headOffset).toBeLessThanOrEqual(RING - 512);
    }
  });
});

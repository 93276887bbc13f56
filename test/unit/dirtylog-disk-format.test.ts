/**
 * The disk dirty log's byte format, checked against fixtures built here byte by byte
 * from the documented (kernel) layout, independently of the codec:
 *   u32 LE magic 0x4D695272 | u32 LE version 2 | u64 LE nr_regions | zeroes to byte 1024 |
 *   clean bits as little-endian 32-bit words (bit i of the word stream = region i),
 *   ⌈nr/64⌉·8 bytes, the whole area rounded up to 512 bytes.
 * Then: the codec round trip, and a real disk log (through the registry, on a file)
 * read by a hand-built reader, and a hand-built file opened by the disk log.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FileDev } from '../../src/core/file-dev.ts';
import { log } from '../../src/core/log.ts';
import type { BlockDev } from '../../src/core/types.ts';
import {
  BITS_OFFSET, MIRROR_DISK_VERSION, MIRROR_MAGIC, checkHeader, decodeDiskLog, decodeHeader, encodeDiskLog, encodeHeader,
  logAreaBytes,
} from '../../src/dirtylog/disk-format.ts';
import { createDirtyLog } from '../../src/dirtylog/registry.ts';
import type { DirtyLogContext } from '../../src/dirtylog/types.ts';

/** A log area written word by word from the documented layout (no codec involved). */
function handBuiltLog(nrRegions: number, clean: ReadonlySet<number>, magic = 0x4d695272, version = 2): Buffer {
  const words = Math.ceil(nrRegions / 64) * 2; // unsigned longs of 64 bits = two 32-bit words
  const size = Math.ceil((1024 + words * 4) / 512) * 512;
  const buf = Buffer.alloc(size);
  buf.writeUInt32LE(magic, 0);
  buf.writeUInt32LE(version, 4);
  buf.writeUInt32LE(nrRegions % 2 ** 32, 8);
  buf.writeUInt32LE(Math.floor(nrRegions / 2 ** 32), 12);
  for (let w = 0; w < words; w++) {
    let word = 0;
    for (let b = 0; b < 32; b++) if (clean.has(w * 32 + b)) word = (word | (1 << b)) >>> 0;
    buf.writeUInt32LE(word, 1024 + w * 4);
  }
  return buf;
}

/** The documented reader: header fields and the set of clean regions. */
function handRead(buf: Buffer): { magic: number; version: number; nrRegions: number; clean: Set<number> } {
  const nrRegions = buf.readUInt32LE(8) + buf.readUInt32LE(12) * 2 ** 32;
  const clean = new Set<number>();
  for (let i = 0; i < nrRegions; i++) {
    const word = buf.readUInt32LE(1024 + Math.floor(i / 32) * 4);
    if ((word >>> (i % 32)) & 1) clean.add(i);
  }
  return { magic: buf.readUInt32LE(0), version: buf.readUInt32LE(4), nrRegions, clean };
}

const CLEAN = new Set([0, 3, 8, 31, 32, 63, 64, 76]);

describe('disk log format: layout', () => {
  it('places magic, version and nr_regions little-endian at byte 0', () => {
    const area = encodeDiskLog(77, (i) => CLEAN.has(i));
    expect([...area.subarray(0, 16)]).toEqual([0x72, 0x52, 0x69, 0x4d, 2, 0, 0, 0, 77, 0, 0, 0, 0, 0, 0, 0]);
    // the magic reads "MiRr" as a big-endian u32, so its bytes on disk are "rRiM"
    expect(area.subarray(0, 4).toString('latin1')).toBe('rRiM');
    expect(area.subarray(16, 1024).every((b) => b === 0)).toBe(true);
  });

  it('matches the hand-built fixture byte for byte', () => {
    expect(encodeDiskLog(77, (i) => CLEAN.has(i)).equals(handBuiltLog(77, CLEAN))).toBe(true);
  });

  it('puts region i at bit i of the little-endian 32-bit word stream from byte 1024', () => {
    const area = encodeDiskLog(100, (i) => i === 33);
    expect(area.readUInt32LE(BITS_OFFSET)).toBe(0);
    expect(area.readUInt32LE(BITS_OFFSET + 4)).toBe(2); // bit 1 of word 1
    expect(area[BITS_OFFSET + 4]).toBe(0b10);
  });

  it('sizes the area as 1024 + ⌈nr/64⌉·8 bytes rounded up to 512', () => {
    const cases: Array<[number, number]> = [[1, 1536], [64, 1536], [4096, 1536], [4097, 2048], [8192, 2048], [8193, 2560]];
    for (const [nr, bytes] of cases) {
      expect(logAreaBytes(nr), `${nr} regions`).toBe(bytes);
      expect(encodeDiskLog(nr, () => true).length).toBe(bytes);
      expect(handBuiltLog(nr, new Set()).length).toBe(bytes);
    }
  });

  it('keeps nr_regions above 2^32 in the high word', () => {
    const buf = Buffer.alloc(16);
    encodeHeader({ magic: MIRROR_MAGIC, version: MIRROR_DISK_VERSION, nrRegions: 2 ** 32 + 5 }, buf);
    expect(buf.readUInt32LE(8)).toBe(5);
    expect(buf.readUInt32LE(12)).toBe(1);
    expect(decodeHeader(buf).nrRegions).toBe(2 ** 32 + 5);
  });
});

describe('disk log format: decoding and checks', () => {
  it('decodes the hand-built fixture', () => {
    const d = decodeDiskLog(handBuiltLog(77, CLEAN));
    expect(d.header).toEqual({ magic: 0x4d695272, version: 2, nrRegions: 77 });
    for (let i = 0; i < 77; i++) expect(d.isClean(i), `region ${i}`).toBe(CLEAN.has(i));
  });

  it('round-trips random bitsets', () => {
    for (const nr of [1, 31, 32, 33, 64, 65, 1000, 4097]) {
      const clean = new Set(Array.from({ length: nr }, (_, i) => i).filter((i) => (i * 2654435761) % 7 < 3));
      const area = encodeDiskLog(nr, (i) => clean.has(i));
      const d = decodeDiskLog(area);
      expect(d.header.nrRegions).toBe(nr);
      expect(Array.from({ length: nr }, (_, i) => d.isClean(i))).toEqual(Array.from({ length: nr }, (_, i) => clean.has(i)));
      expect(handRead(area).clean).toEqual(clean);
    }
  });

  it('accepts magic + version 2 (and 1, the little-endian equivalent); refuses the rest', () => {
    expect(checkHeader(decodeHeader(handBuiltLog(8, new Set())))).toBe('ok');
    expect(checkHeader(decodeHeader(handBuiltLog(8, new Set(), MIRROR_MAGIC, 1)))).toBe('ok');
    expect(checkHeader(decodeHeader(handBuiltLog(8, new Set(), MIRROR_MAGIC, 3)))).toBe('bad-version');
    expect(checkHeader(decodeHeader(handBuiltLog(8, new Set(), 0x724d6952)))).toBe('bad-magic');
    expect(checkHeader(decodeHeader(Buffer.alloc(512)))).toBe('bad-magic');
  });
});

describe('disk log format: a real log on a file', () => {
  const REGION = 8;
  const REGIONS = 77;
  const LENGTH = REGION * REGIONS - 3; // last region short
  let dir: string;
  let devs: FileDev[];

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-dlfmt-'));
    devs = [];
  });
  afterEach(() => {
    for (const d of devs) d.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  function ctx(): DirtyLogContext {
    return {
      device: 'fmt',
      open: async (ref: string): Promise<BlockDev> => {
        const d = FileDev.open(ref, ref);
        devs.push(d);
        return d;
      },
      event: () => undefined,
      log: log('test'),
      flushData: () => Promise.resolve(),
    };
  }

  const closeAll = (): void => {
    for (const d of devs.splice(0)) d.close();
  };

  it('writes what a hand-built reader reads', async () => {
    const file = path.join(dir, 'log');
    fs.writeFileSync(file, Buffer.alloc(4096, 0xaa)); // garbage: no magic, a new log
    const dl = await createDirtyLog('disk', ctx(), [file, String(REGION), 'nosync'], LENGTH);
    await dl.resume();
    for (const r of [2, 40, 76]) dl.markRegion(r);
    await dl.flush();
    dl.clearRegion(40);
    await dl.flush();
    await dl.destroy();
    closeAll();
    const onDisk = fs.readFileSync(file);
    const got = handRead(onDisk);
    expect(got.magic).toBe(0x4d695272);
    expect(got.version).toBe(2);
    expect(got.nrRegions).toBe(REGIONS);
    const expected = new Set(Array.from({ length: REGIONS }, (_, i) => i).filter((i) => i !== 2 && i !== 76));
    expect(got.clean).toEqual(expected);
    // padding bits after the last region are zero, bytes 16…1023 too, and nothing past the area was touched
    expect(onDisk.readUInt32LE(1024 + 8)).toBe(0xfff); // regions 64…75 clean, 76 dirty, bits 13… padding
    expect(onDisk.readUInt32LE(1024 + 12)).toBe(0);
    expect(onDisk.subarray(16, 1024).every((b) => b === 0)).toBe(true);
    expect(onDisk.subarray(logAreaBytes(REGIONS)).every((b) => b === 0xaa)).toBe(true);
  });

  it('reads a hand-built log: clean regions are in sync, the others need resync', async () => {
    const file = path.join(dir, 'log');
    fs.writeFileSync(file, Buffer.concat([handBuiltLog(REGIONS, CLEAN), Buffer.alloc(512)]));
    const dl = await createDirtyLog('disk', ctx(), [file, String(REGION)], LENGTH);
    expect(dl.regionCount).toBe(REGIONS);
    await dl.resume();
    for (let i = 0; i < REGIONS; i++) expect(dl.inSync(i), `region ${i}`).toBe(CLEAN.has(i));
    expect(dl.getSyncCount()).toBe(CLEAN.size);
    const work: number[] = [];
    for (let r = dl.getResyncWork(); r !== null; r = dl.getResyncWork()) work.push(r);
    expect(work).toEqual(Array.from({ length: REGIONS }, (_, i) => i).filter((i) => !CLEAN.has(i)));
    await dl.destroy();
  });
});

/**
 * Target compliance: one suite run against every built-in target type (alone and mixed in
 * multi-line tables), over real sparse image files, through the library engine. Each case
 * carries an independent reference model (target-cases.ts) of where every sector lands;
 * the images are read back with node:fs and compared byte for byte.
 */
import fs from 'node:fs';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { CASES, IMAGES, IMAGE_SECTORS, type Loc, type ReadPlace, type TargetCase, type WritePlace } from './target-cases.ts';
import {
  SECTOR, countingTarget, expectCode, expectSameBytes, makeImage, makeTempDir, prng, tableText,
} from './helpers.ts';

const MAX_IO_SECTORS = 512; // 256 KiB

const isLoc = (p: ReadPlace | WritePlace): p is Loc => typeof p === 'object';

function seedOf(name: string): number {
  let h = 2166136261;
  for (const c of name) h = Math.imul(h ^ c.charCodeAt(0), 16777619);
  return h >>> 0;
}

describe.each(CASES)('target compliance: $name', (tc: TargetCase) => {
  let dir: string;
  let images: string[];
  /** what each image must hold */
  let model: Buffer[];
  let dm: DeviceMapper;

  beforeEach(() => {
    dir = makeTempDir();
    images = Array.from({ length: IMAGES }, (_, i) => makeImage(dir, `img${i}`, IMAGE_SECTORS, 1000 + i));
    model = images.map((f) => fs.readFileSync(f));
    dm = new DeviceMapper();
  });

  afterEach(async () => {
    await dm.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const sectorsOf = (sector: number, count: number): number[] => Array.from({ length: count }, (_, k) => sector + k);

  /** the bytes a read of [sector, sector+count) must return, or null when it must fail */
  function expectedRead(sector: number, count: number): Buffer | null {
    const out = Buffer.alloc(count * SECTOR);
    for (const [k, s] of sectorsOf(sector, count).entries()) {
      const p = tc.read(s);
      if (p === 'error') return null;
      if (p !== 'zero') model[p.file]!.copy(out, k * SECTOR, p.sector * SECTOR, (p.sector + 1) * SECTOR);
    }
    return out;
  }

  /** apply a write to the model; returns the places it reached and whether it must fail */
  function modelWrite(sector: number, data: Buffer): { locs: Loc[]; fails: boolean } {
    const places = sectorsOf(sector, data.length / SECTOR).map((s) => tc.write(s));
    const locs: Loc[] = [];
    for (const [k, p] of places.entries()) {
      if (!isLoc(p)) continue;
      data.copy(model[p.file]!, p.sector * SECTOR, k * SECTOR, (k + 1) * SECTOR);
      locs.push(p);
    }
    return { locs, fails: places.includes('error') };
  }

  /** read the images with node:fs and compare them with the model */
  function checkImages(locs?: Loc[]): void {
    if (locs) {
      const one = Buffer.alloc(SECTOR);
      const fds = images.map((f) => fs.openSync(f, 'r'));
      try {
        for (const l of locs) {
          fs.readSync(fds[l.file]!, one, 0, SECTOR, l.sector * SECTOR);
          expectSameBytes(one, model[l.file]!.subarray(l.sector * SECTOR, (l.sector + 1) * SECTOR), `img${l.file} sector ${l.sector}`);
        }
      } finally {
        for (const fd of fds) fs.closeSync(fd);
      }
      return;
    }
    for (const [i, f] of images.entries()) expectSameBytes(fs.readFileSync(f), model[i]!, `img${i}`);
  }

  async function write(sector: number, data: Buffer, flags: { fua?: boolean } = {}): Promise<Loc[]> {
    const { locs, fails } = modelWrite(sector, data);
    const p = dm.write('vol', sector * SECTOR, data, flags);
    if (fails) await expectCode(p, 'EIO');
    else await p;
    return locs;
  }

  async function read(sector: number, count: number): Promise<void> {
    const expected = expectedRead(sector, count);
    const p = dm.read('vol', sector * SECTOR, count * SECTOR);
    if (expected === null) await expectCode(p, 'EIO');
    else expectSameBytes(await p, expected, `read of ${count} sectors at ${sector}`);
  }

  it('(a) round-trips its table: the printed table loads into a second device as the same table', async () => {
    await dm.create('vol', { table: tc.table(images) });
    const printed = tableText(dm.table('vol'));
    expect(printed.split('\n')).toHaveLength(tc.table(images).split('\n').length);
    await dm.create('copy', { table: printed });
    expect(tableText(dm.table('copy'))).toBe(printed);
    expect(dm.info('copy').sectors).toBe(tc.sectors);
  });

  it('(b) maps random reads and writes (512 B to 256 KiB, across target and chunk edges) as the model says', async () => {
    await dm.create('vol', { table: tc.table(images) });
    const rng = prng(seedOf(tc.name));
    for (let i = 0; i < 120; i++) {
      let count = 1 + rng.int(MAX_IO_SECTORS);
      let sector: number;
      if (i % 2 === 1 && tc.boundaries.length > 0) {
        const edge = tc.boundaries[rng.int(tc.boundaries.length)]!;
        sector = Math.max(0, edge - 1 - rng.int(Math.max(1, count - 1)));
      } else {
        sector = rng.int(tc.sectors - Math.min(count, tc.sectors) + 1);
      }
      count = Math.min(count, tc.sectors - sector);
      if (rng.next() < 0.5) checkImages(await write(sector, rng.fill(Buffer.alloc(count * SECTOR))));
      else await read(sector, count);
    }
    checkImages();
    for (let s = 0; s < tc.sectors; s += MAX_IO_SECTORS) await read(s, Math.min(MAX_IO_SECTORS, tc.sectors - s));
  });

  it('(b) maps concurrent writes to disjoint ranges as the model says', async () => {
    await dm.create('vol', { table: tc.table(images) });
    const rng = prng(seedOf(tc.name) ^ 0x5eed);
    const slot = Math.floor(tc.sectors / 16);
    const jobs: Promise<Loc[]>[] = [];
    for (let j = 0; j < 16; j++) {
      const count = 1 + rng.int(Math.min(slot, MAX_IO_SECTORS));
      const sector = j * slot + rng.int(slot - count + 1);
      jobs.push(write(sector, rng.fill(Buffer.alloc(count * SECTOR))));
    }
    await Promise.all(jobs);
    checkImages();
    for (let s = 0; s < tc.sectors; s += MAX_IO_SECTORS) await read(s, Math.min(MAX_IO_SECTORS, tc.sectors - s));
  });

  it('(c) passes FUA writes and flushes to the devices below (counted by a plugin target under each image)', async () => {
    const { type, counts } = countingTarget();
    dm.targets.register(type);
    for (let i = 0; i < IMAGES; i++) await dm.create(`cnt${i}`, { table: `0 ${IMAGE_SECTORS} counting ${images[i]} 0` });
    await dm.create('vol', { table: tc.table(images.map((_, i) => `dm:cnt${i}`)) });
    const rng = prng(seedOf(tc.name) ^ 0xf0a);
    const sector = tc.boundaries[0] !== undefined ? Math.max(0, tc.boundaries[0] - 40) : 0;
    const locs = await write(sector, rng.fill(Buffer.alloc(96 * SECTOR)), { fua: true });
    for (const f of new Set(locs.map((l) => l.file))) expect(counts.get(`cnt${f}`)!.fuaWrites, `FUA writes reaching img${f}`).toBeGreaterThan(0);
    const written = counts.get('cnt0')!.writes + counts.get('cnt1')!.writes + counts.get('cnt2')!.writes;
    expect(written).toBe(counts.get('cnt0')!.fuaWrites + counts.get('cnt1')!.fuaWrites + counts.get('cnt2')!.fuaWrites);
    await dm.flush('vol'); // an error line takes no flush (dm's num_flush_bios = 0): it never fails one
    for (let f = 0; f < IMAGES; f++) {
      expect(counts.get(`cnt${f}`)!.flushes > 0, `flush reaching img${f}`).toBe(tc.flushes.includes(f));
    }
    checkImages();
  });
});

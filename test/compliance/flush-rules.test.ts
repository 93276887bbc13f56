/**
 * dm's per-target flush rule (`num_flush_bios`, `Target.flushBios` here): `error` and `zero`
 * take no flush, so the core never sends them one, neither for a device flush nor for the
 * flush before a `preflush` bio. A flush of a table with such lines succeeds once its other
 * lines are flushed, and those are really flushed: counted by a plugin target below them,
 * held by a `delay` flush class, and seen in the file backend's shared dirty flag.
 */
import fs from 'node:fs';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { Bio } from '../../src/core/bio.ts';
import type { FileSpan, TargetType } from '../../src/core/types.ts';
import { DeviceMapper } from '../../src/index.ts';
import { SECTOR, countingTarget, expectCode, expectSameBytes, makeImage, makeTempDir, prng, track, waitFor, type BioCounts } from './helpers.ts';

const IMG_SECTORS = 4096;

let dir: string;
let img: string;
let dm: DeviceMapper;
let counts: Map<string, BioCounts>;
const rng = prng(7);
const randomSectors = (count: number): Buffer => rng.fill(Buffer.alloc(count * SECTOR));

/** the bios a `noflush` line saw: a plugin target declaring `flushBios: 0` that records every op */
const seen: Bio['op'][] = [];
const noflush: TargetType = {
  name: 'noflush',
  version: [1, 0, 0],
  create: () => ({
    flushBios: 0,
    map(bio) {
      seen.push(bio.op);
      if (bio.op === 'read') bio.data.fill(0x5a);
      return Promise.resolve();
    },
    status: () => '',
  }),
};

function fileSectors(sector: number, count: number): Buffer {
  const buf = Buffer.alloc(count * SECTOR);
  const fd = fs.openSync(img, 'r');
  try {
    fs.readSync(fd, buf, 0, buf.length, sector * SECTOR);
  } finally {
    fs.closeSync(fd);
  }
  return buf;
}

/** the file backend's "written since the last flush" flag of the first line of `name` (linear over img) */
function dirty(name: string): boolean {
  const span = dm.get(name).live!.fileMap()![0] as FileSpan;
  const shared = span.dev.share();
  fs.closeSync(shared.fd);
  return Atomics.load(shared.state, 0) !== 0;
}

beforeEach(async () => {
  dir = makeTempDir('dmkit-flush-');
  img = makeImage(dir, 'a.img', IMG_SECTORS, 3);
  dm = new DeviceMapper();
  const c = countingTarget();
  counts = c.counts;
  dm.targets.register(c.type);
  dm.targets.register(noflush);
  seen.length = 0;
  await dm.create('cnt', { table: `0 ${IMG_SECTORS} counting ${img} 0` });
});

afterEach(async () => {
  await dm.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('targets that take no flush (flushBios: 0)', () => {
  it('a table of only error lines: flush succeeds; reads, writes and preflush writes still fail EIO', async () => {
    await dm.create('vol', { table: '0 64 error\n64 64 error 8:0 0' });
    await dm.flush('vol');
    await expectCode(dm.read('vol', 0, SECTOR), 'EIO');
    await expectCode(dm.write('vol', 0, randomSectors(1)), 'EIO');
    await expectCode(dm.write('vol', 64 * SECTOR, randomSectors(1), { preflush: true }), 'EIO');
    await expectCode(dm.discard('vol', 0, 8 * SECTOR), 'EIO');
  });

  it('a table of only zero lines: flush and preflush writes succeed, reads stay zero', async () => {
    await dm.create('vol', { table: '0 64 zero' });
    await dm.flush('vol');
    await dm.write('vol', 0, randomSectors(8), { preflush: true, fua: true });
    expectSameBytes(await dm.read('vol', 0, 8 * SECTOR), Buffer.alloc(8 * SECTOR), 'zero after writes');
  });

  it('the core never sends such a target a flush, for a device flush or a preflush, but does send it the bio', async () => {
    await dm.create('vol', { table: `0 64 noflush\n64 64 linear dm:cnt 0` });
    await dm.flush('vol');
    expect(counts.get('cnt')!.flushes).toBe(1);
    await dm.write('vol', 0, randomSectors(8), { preflush: true });
    expect(counts.get('cnt')!.flushes).toBe(2); // the preflush reached the other line
    expect(seen).toEqual(['write']);
    const data = await dm.read('vol', 0, 2 * SECTOR);
    expect(data.every((b) => b === 0x5a)).toBe(true);
    expect(seen).toEqual(['write', 'read']);
  });

  it('linear + error: the flush reaches the linear leg and succeeds; writes to the error part fail EIO', async () => {
    await dm.create('vol', { table: '0 512 linear dm:cnt 0\n512 64 error\n576 64 zero' });
    const data = randomSectors(16);
    await dm.write('vol', 8 * SECTOR, data);
    await dm.flush('vol');
    expect(counts.get('cnt')!.flushes).toBe(1);
    expectSameBytes(fileSectors(8, 16), data, 'image under the linear line');
    await expectCode(dm.write('vol', 520 * SECTOR, randomSectors(1)), 'EIO');
    // a write across the linear/error boundary fails, and its linear part lands
    const across = randomSectors(16);
    await expectCode(dm.write('vol', 504 * SECTOR, across), 'EIO');
    expectSameBytes(fileSectors(504, 8), across.subarray(0, 8 * SECTOR), 'linear part of a split write');
    // a preflush write to the error part: the flush goes to the linear line first, then the write fails
    await expectCode(dm.write('vol', 512 * SECTOR, randomSectors(1), { preflush: true }), 'EIO');
    expect(counts.get('cnt')!.flushes).toBe(2);
    await dm.flush('vol');
    expect(counts.get('cnt')!.flushes).toBe(3);
  });

  it('linear over a file + error: the flush fdatasyncs the file (its dirty flag clears)', async () => {
    await dm.create('vol', { table: `0 1024 linear ${img} 0\n1024 64 error` });
    await dm.write('vol', 0, randomSectors(8));
    expect(dirty('vol')).toBe(true);
    await dm.flush('vol');
    expect(dirty('vol')).toBe(false);
    await dm.write('vol', 16 * SECTOR, randomSectors(8));
    expect(dirty('vol')).toBe(true);
    await expectCode(dm.write('vol', 1024 * SECTOR, randomSectors(1), { preflush: true }), 'EIO');
    expect(dirty('vol')).toBe(false);
  });

  it('delay with a flush class + error: the flush waits for the held flush, then succeeds', async () => {
    await dm.create('vol', { table: `0 1024 delay ${img} 0 0 ${img} 0 0 ${img} 0 300\n1024 64 error` });
    const t0 = Date.now();
    const f = track(dm.flush('vol'));
    await waitFor(() => dm.status('vol')[0]!.params === '0 0 1', 'the flush held by the delay line');
    expect(f.settled).toBe(false);
    await f.promise;
    expect(Date.now() - t0).toBeGreaterThanOrEqual(290);
    expect(dm.status('vol')[0]!.params).toBe('0 0 0');
  });
});

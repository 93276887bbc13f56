/**
 * `progress()` of a resyncing mirror (what `dmkit wait --progress` draws): sectors in sync
 * out of the whole, rising while the resync runs, null once everything is in sync.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { makeTempDir } from './helpers.ts';

let dir: string;
let dm: DeviceMapper;

beforeEach(() => {
  dir = makeTempDir('dmkit-mirror-progress-');
  dm = new DeviceMapper();
});

afterEach(async () => {
  await dm.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

function image(name: string, bytes: number, fill?: number): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, fill === undefined ? Buffer.alloc(0) : Buffer.alloc(bytes, fill));
  fs.truncateSync(f, bytes);
  return f;
}

it('reports resync progress in sectors and null once in sync', async () => {
  const a = image('a.img', 8 << 20, 0x5a);
  const b = image('b.img', 8 << 20);
  // 16384 sectors in 64 regions of 256; throttle so the first look sees work left
  await dm.create('m', { table: `0 16384 mirror core 1 256 2 ${a} 0 ${b} 0` });
  await dm.message('m', 0, ['resync-rate', '1048576']);
  const first = dm.progress('m');
  expect(first).not.toBeNull();
  expect(first!.work).toBe('resync');
  expect(first!.totalSectors).toBe(16384);
  expect(first!.doneSectors).toBeLessThan(16384);
  await dm.message('m', 0, ['resync-rate', '0']);
  let last = first!.doneSectors;
  for (;;) {
    const ev = dm.get('m').eventNr; // read before progress: the in-sync event can't slip between
    const p = dm.progress('m');
    if (!p) break;
    expect(p.doneSectors).toBeGreaterThanOrEqual(last);
    expect(p.doneSectors % 256).toBe(0);
    last = p.doneSectors;
    await dm.wait('m', ev);
  }
  expect(dm.progress('m')).toBeNull();
  expect(dm.status('m')[0]!.params).toContain(' 64/64 1 AA ');
  expect(fs.readFileSync(b).equals(fs.readFileSync(a))).toBe(true);
});

it('lifting resync-rate ends a throttle wait at once, not after the sleep the old rate computed', async () => {
  const a = image('a.img', 8 << 20, 0x33);
  const b = image('b.img', 8 << 20);
  // at 4 KiB/s the first ranges alone (4 × 128 KiB) would wait about two minutes
  await dm.create('m', { table: `0 16384 mirror core 1 256 2 ${a} 0 ${b} 0` });
  await dm.message('m', 0, ['resync-rate', '4096']);
  await new Promise((r) => setTimeout(r, 300));
  expect(dm.progress('m')).not.toBeNull();
  await dm.message('m', 0, ['resync-rate', '0']);
  const deadline = Date.now() + 10_000;
  while (dm.progress('m') && Date.now() < deadline) {
    const ev = dm.get('m').eventNr;
    if (!dm.progress('m')) break;
    await Promise.race([dm.wait('m', ev), new Promise((r) => setTimeout(r, 200))]);
  }
  expect(dm.progress('m')).toBeNull();
  expect(fs.readFileSync(b).equals(fs.readFileSync(a))).toBe(true);
});

it('is null for targets without background work', async () => {
  const a = image('l.img', 1 << 20);
  await dm.create('l', { table: `0 2048 linear ${a} 0` });
  expect(dm.progress('l')).toBeNull();
});

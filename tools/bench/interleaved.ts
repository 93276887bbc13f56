/**
 * Development aid, not the reported method: several sides (dmkit and plain-Node variants)
 * in ONE process, alternating in short slices many times, so load from other processes on a
 * shared machine hits every side alike. Use it to judge a hot-path change or to calibrate
 * the reference quickly; the numbers in docs/benchmarks.md come from `npm run bench`.
 *
 *   npx tsx tools/bench/interleaved.ts [--sides dmkit,node:callback,node:promise:0]
 *       [--image FILE] [--size 256M] [--slices 20] [--slice 0.15] [--patterns rand-read,…]
 *
 * A side is `dmkit`, `dmkit@<path to another copy of src/index.ts>` (to compare two versions
 * of the engine on the same image; the copy must not take the image's flock), or
 * `node:<callback|promise|filehandle>[:<readChunk, default 0>]`.
 * Prints, per pattern and side, the median value and the median per-slice-pair ratio to
 * the first side.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { createImage, L1_PATTERNS, warmPageCache } from './l1-library.ts';
import type { MappedDevice } from '../../src/index.ts';
import type { NodeApi } from './lib-sides.ts';
import { dmkitFactory, nodeFactory, openDmkit } from './lib-sides.ts';
import { parseSize } from './size.ts';
import { median } from './stats.ts';
import type { Pattern, Slot } from './workload.ts';
import { drive, makeSlots } from './workload.ts';

async function main(): Promise<void> {
  const { values } = parseArgs({ options: {
    sides: { type: 'string', default: 'dmkit,node:callback' },
    image: { type: 'string' }, size: { type: 'string', default: '256M' },
    slices: { type: 'string', default: '20' }, slice: { type: 'string', default: '0.15' },
    patterns: { type: 'string' },
  } });
  const size = parseSize(values.size!);
  let image = values.image;
  let tmp: string | null = null;
  if (!image) {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-il-'));
    image = path.join(tmp, 'img');
    createImage(image, size);
  }
  const filter = values.patterns?.split(',') ?? [];
  const patterns = L1_PATTERNS.filter((p) => !filter.length || filter.some((f) => p.id.includes(f)));
  const names = values.sides!.split(',');
  const slices = Number(values.slices);
  const slice = Number(values.slice);
  const engines = new Map<string, MappedDevice>();
  for (const n of names.filter((x) => x.startsWith('dmkit'))) {
    engines.set(n, await openDmkit(`0 ${size / 512} linear ${image} 0`, `il${engines.size}`, n.split('@')[1]));
  }
  for (const p of patterns) {
    const sides: Slot[][] = [];
    for (const n of names) {
      const [kind, api, chunk] = n.split(':');
      if (kind!.startsWith('dmkit')) sides.push(makeSlots(dmkitFactory(engines.get(n)!, p), p));
      else sides.push(makeSlots(await nodeFactory({ kind: 'node', file: image, api: (api ?? 'callback') as NodeApi, readChunk: parseSize(chunk ?? '0') }, p), p));
    }
    const value = (r: { ops: number; bytes: number; seconds: number }, q: Pattern): number =>
      q.access === 'seq' ? r.bytes / r.seconds / 1e6 : r.ops / r.seconds;
    warmPageCache(image, size);
    for (const f of sides) await drive(f, p, size, 0.2, 7);
    const vals: number[][] = sides.map(() => []);
    for (let i = 0; i < slices; i++) {
      if (i % 5 === 0) warmPageCache(image, size);
      const order = sides.map((_, k) => k);
      if (i % 2) order.reverse();
      for (const k of order) vals[k]!.push(value(await drive(sides[k]!, p, size, slice, i + 1), p));
    }
    const line = names.map((n, k) => {
      const ratio = median(vals[k]!.map((x, i) => x / vals[0]![i]!));
      return `${n} ${median(vals[k]!).toFixed(0)}${k ? ` (×${ratio.toFixed(3)})` : ''}`;
    }).join('  ');
    console.log(`${p.id.padEnd(19)} ${p.access === 'seq' ? 'MB/s' : 'IOPS'}  ${line}  load ${os.loadavg()[0]!.toFixed(1)}`);
  }
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  process.exit(0);
}

void main();

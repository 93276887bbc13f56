/**
 * Shared fixtures of the target compliance suites: sparse image files in a temp dir, a
 * seeded PRNG, a counting target plugin (a real target type registered in the engine, used
 * to see which bios reach a device), and small assertion helpers.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'vitest';
import { ArgReader } from '../../src/core/args.ts';
import type { BlockDev, TargetType } from '../../src/core/types.ts';
import type { TableLineOut } from '../../src/index.ts';

export const SECTOR = 512;

// the suites provoke failures on purpose; keep the engine's warnings about them quiet
process.env.DMKIT_LOG ??= 'error';

/** mulberry32: a small seeded PRNG; `int(n)` is uniform in [0, n). */
export function prng(seed: number): { next(): number; int(n: number): number; fill(buf: Buffer): Buffer } {
  let a = seed >>> 0;
  const next = (): number => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int: (n) => Math.floor(next() * n),
    fill(buf) {
      for (let i = 0; i < buf.length; i += 4) buf.writeUInt32LE((next() * 4294967296) >>> 0, i);
      return buf;
    },
  };
}

export function makeTempDir(prefix = 'dmkit-targets-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/**
 * A sparse image of `sectors` sectors with a few seeded 64 KiB data islands (so reads
 * tell places apart while most of the file stays a hole). Returns its path.
 */
export function makeImage(dir: string, name: string, sectors: number, seed: number): string {
  const file = path.join(dir, name);
  const fd = fs.openSync(file, 'w+');
  try {
    fs.ftruncateSync(fd, sectors * SECTOR);
    const rng = prng(seed);
    const island = Buffer.alloc(64 * 1024);
    for (let pos = 0; pos + island.length <= sectors * SECTOR; pos += 512 * 1024) {
      fs.writeSync(fd, rng.fill(island), 0, island.length, pos);
    }
  } finally {
    fs.closeSync(fd);
  }
  return file;
}

/** dmsetup-style table text from `dm.table()` output */
export function tableText(lines: TableLineOut[]): string {
  return lines.map((l) => (l.params === '' ? `${l.start} ${l.length} ${l.type}` : `${l.start} ${l.length} ${l.type} ${l.params}`)).join('\n');
}

/** byte offset of the first difference, or -1 */
export function firstDiff(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/** assert two buffers are equal, naming the first differing sector */
export function expectSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  const d = firstDiff(actual, expected);
  expect(d === -1 ? 'equal' : `${what}: first difference at byte ${d} (sector ${Math.floor(d / SECTOR)})`).toBe('equal');
}

/** expect `p` to reject with a BlockError-like error carrying `code`; returns its message */
export async function expectCode(p: Promise<unknown>, code: string): Promise<string> {
  const err = await p.then(() => null, (e: unknown) => e as Error & { code?: string });
  expect(err, `expected a rejection with ${code}`).not.toBeNull();
  expect(err!.code).toBe(code);
  return err!.message;
}

/** Track whether a promise has settled, without changing it. */
export function track<T>(p: Promise<T>): { readonly settled: boolean; readonly promise: Promise<T> } {
  const state = { settled: false, promise: p };
  p.then(() => { state.settled = true; }, () => { state.settled = true; });
  return state;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** poll `cond` every few ms until true (gives up after ~10 s with a clear failure) */
export async function waitFor(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 2000; i++) {
    if (cond()) return;
    await sleep(5);
  }
  throw new Error(`timed out waiting for ${what}`);
}

export interface BioCounts {
  reads: number;
  writes: number;
  fuaWrites: number;
  flushes: number;
  other: number;
}

/**
 * `counting <dev> <offset>`: a linear mapping that counts the bios passing through it,
 * per mapped device name. A real target type for the engine's registry; the counts live
 * in the closure of one `countingTarget()` call.
 */
export function countingTarget(): { type: TargetType; counts: Map<string, BioCounts> } {
  const counts = new Map<string, BioCounts>();
  const type: TargetType = {
    name: 'counting',
    version: [1, 0, 0],
    async create(ctx, args) {
      const r = new ArgReader(args, 'counting');
      const ref = r.next('device');
      const offset = r.uint('offset');
      r.expectEnd();
      const dev: BlockDev = await ctx.open(ref);
      const c: BioCounts = { reads: 0, writes: 0, fuaWrites: 0, flushes: 0, other: 0 };
      counts.set(ctx.device, c);
      return {
        map(bio) {
          if (bio.op === 'flush') {
            c.flushes++;
            return dev.submit(bio);
          }
          if (bio.op === 'read') c.reads++;
          else if (bio.op === 'write') {
            c.writes++;
            if (bio.flags.fua) c.fuaWrites++;
          } else c.other++;
          return dev.submit({ ...bio, sector: bio.sector + offset });
        },
        status: (t) => (t === 'table' ? `${dev.ref} ${offset}` : `${c.reads} ${c.writes} ${c.flushes}`),
      };
    },
  };
  return { type, counts };
}

/**
 * What the replication suites (r-replication.ts: R1, R3; r-tcp.ts: R1-tcp, RC; r-tcp-r2.ts:
 * R2) share on the driving side: `--opt` values, zero-filled log files, and the report's
 * sides and rows.
 */
import fs from 'node:fs';
import { parseSize } from './size.ts';
import { median, pairRatios } from './stats.ts';
import type { BenchContext, Row, Sample, Side } from './suite.ts';

/** `--opt key=<size>` (64m, 4k, …) */
export function size(ctx: BenchContext, key: string, fallback: number): number {
  const v = ctx.opts[key];
  return v === undefined ? fallback : parseSize(v);
}

/** `--opt key=<whole number >= 0>` */
export function int(ctx: BenchContext, key: string, fallback: number): number {
  const v = ctx.opts[key];
  const n = v === undefined ? fallback : Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`--opt ${key} must be a whole number >= 0, got '${v}'`);
  return n;
}

/** `--opt key=1|0` (also on/off, true/false) */
export function flag(ctx: BenchContext, key: string, fallback: boolean): boolean {
  const v = ctx.opts[key];
  return v === undefined ? fallback : v !== '0' && v !== 'off' && v !== 'false';
}

/** a file of `bytes` zeroes, every block written (no holes) */
export function zeroFile(file: string, bytes: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    const z = Buffer.alloc(1 << 20);
    for (let pos = 0; pos < bytes; pos += z.length) fs.writeSync(fd, z, 0, Math.min(z.length, bytes - pos), pos);
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export function side(name: string, detail: string, samples: Sample[], rss: number | null, rssFrom?: string): Side {
  return { name, detail, samples, median: median(samples.map((s) => s.value)), medianRssKiB: rss, ...(rssFrom ? { rssFrom } : {}) };
}

/** a row with its per-pair ratios a / b and their median; one slice per sample unless given */
export function row(r: Omit<Row, 'ratios' | 'ratio' | 'slices'> & { slices?: number }): Row {
  const ratios = pairRatios(r.a.samples.map((s) => s.value), r.b.samples.map((s) => s.value));
  return { ...r, slices: r.slices ?? 1, ratios, ratio: median(ratios) };
}

/**
 * RS: the replicator's full resync against the copy service's raw speed, with and without
 * an application writing meanwhile, in one run (library, in this process: the resync, the
 * writer and the copy share one event loop, as in the daemon).
 *
 * Per pair, in an order that rotates each pair:
 *   copy      copyRanges of the whole device, local image → remote image (FileDevs), 1 MiB
 *             chunks, 4 ranges of one region each in flight, then a flush: the raw speed
 *   alone     a group like R3's over a fresh `disk` dirty log (every region out of sync):
 *             from creating the replicator-dev to `1:A,0,0`, resync-rate auto
 *   writer    the same with a writer (4 KiB random writes, `rsqd` in flight) from the start
 *             to the end of the resync, resync-rate auto
 *   writer-fixed  the same with `resync-rate 0` (fixed, unlimited, 4 regions in flight: the
 *             copy as it was before the controller), for the writer's side of the trade
 *   solo      the writer alone on the in-sync group for 2 s: its quiet latency
 *
 * Rows (value = device bytes / seconds, ratio per pair): alone vs copy (goal 0.8, as M2's
 * mirror resync vs cp), writer vs copy, writer-fixed vs copy; and the writer's p99 latency
 * during the resync, auto vs fixed (lower is better), with IOPS and p50 in `extra`.
 *
 *   --opt rssize=128m  rsregion=1024  rsqd=4
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { copyRanges } from '../../src/core/copy.ts';
import { FileDev } from '../../src/core/file-dev.ts';
import { DeviceMapper } from '../../src/index.ts';
import { int, row, side, size, zeroFile } from './r-common.ts';
import { sleep } from './r-probe.ts';
import { formatSize } from './size.ts';
import { median } from './stats.ts';
import type { BenchContext, Row, Sample, Suite } from './suite.ts';

type Kind = 'copy' | 'alone' | 'writer' | 'writer-fixed' | 'solo';

interface RsResult {
  seconds: number;
  bytes: number;
  writes: number;
  p50us: number;
  p99us: number;
  resyncedBytes: number;
  /** the controller said it backed off for the writer (`resyncFlow.backoff`) at some sample */
  backoffSeen: boolean;
}

function pct(xs: number[], p: number): number {
  if (xs.length === 0) return 0;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

function fill(file: string, bytes: number, seed: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    const chunk = crypto.createHash('sha512').update(String(seed)).digest();
    const buf = Buffer.alloc(1 << 20);
    for (let i = 0; i < buf.length; i += chunk.length) chunk.copy(buf, i);
    for (let pos = 0; pos < bytes; pos += buf.length) {
      buf.writeUInt32LE(pos >>> 20, 0); // every MiB differs a little
      fs.writeSync(fd, buf, 0, Math.min(buf.length, bytes - pos), pos);
    }
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** 4 KiB random writes, `qd` in flight, until `stop()`; latencies in µs */
function startWriter(dm: DeviceMapper, vol: string, bytes: number, qd: number, seed: number): { stop(): Promise<number[]> } {
  let stopped = false;
  const lat: number[] = [];
  let x = seed >>> 0 || 1;
  const blocks = bytes / 4096;
  const lane = async (): Promise<void> => {
    const data = Buffer.alloc(4096, seed & 0xff);
    while (!stopped) {
      x ^= x << 13; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
      const t = performance.now();
      await dm.write(vol, (x % blocks) * 4096, data);
      lat.push((performance.now() - t) * 1000);
    }
  };
  const lanes = Array.from({ length: qd }, lane);
  return {
    async stop() {
      stopped = true;
      await Promise.all(lanes);
      return lat;
    },
  };
}

function siteOf(dm: DeviceMapper): { stateChar: string; resyncedBytes: number; resyncFlow?: { backoff: string | null } } {
  const d = dm.status('repl')[0]!.detail as { sites: Array<{ slink: number; stateChar: string; resyncedBytes: number; resyncFlow?: { backoff: string | null } }> };
  return d.sites.find((s) => s.slink === 1)!;
}

async function runOne(kind: Kind, t: (n: string) => string, bytes: number, region: number, qd: number, seed: number): Promise<RsResult> {
  const sectors = bytes / 512;
  zeroFile(t('rs-remote.img'), bytes);
  if (kind === 'copy') {
    const src = FileDev.open('rs-local', t('rs-local.img'));
    const dst = FileDev.open('rs-remote', t('rs-remote.img'));
    try {
      const start = performance.now();
      let next = 0;
      const ranges = (): { sector: number; sectors: number } | null => {
        if (next >= sectors) return null;
        const sector = next;
        next += region;
        return { sector, sectors: Math.min(region, sectors - sector) };
      };
      await copyRanges({ src, dst: [dst], ranges, chunkSectors: Math.min(region, 2048), concurrency: 4, flushAtEnd: true });
      const seconds = (performance.now() - start) / 1000;
      return { seconds, bytes, writes: 0, p50us: 0, p99us: 0, resyncedBytes: bytes, backoffSeen: false };
    } finally {
      src.close();
      dst.close();
    }
  }
  zeroFile(t('rs-rlog'), (8192 + 64) * 512);
  zeroFile(t('rs-dlog'), 1 << 20);
  const dm = new DeviceMapper();
  try {
    await dm.create('site0', { table: `0 ${sectors} linear ${t('rs-remote.img')} 0` });
    await dm.create('repl', { table: `0 1 replicator ringbuffer 4 ${t('rs-rlog')} 0 auto 8192 blockdev 1 0 blockdev 2 1 async` });
    if (kind === 'writer-fixed') await dm.message('repl', 0, ['resync-rate', '0']);
    const solo = kind === 'solo';
    // solo: the site starts in sync (nosync), the writer alone for 2 s
    const dlog = solo ? `disk 3 ${t('rs-dlog')} ${region} nosync` : `disk 2 ${t('rs-dlog')} ${region}`;
    const start = performance.now();
    await dm.create('vol0', { table: `0 ${sectors} replicator-dev dm:repl 0 0 1 ${t('rs-local.img')} nolog 0 1 1 dm:site0 ${dlog}` });
    const writer = kind === 'alone' ? null : startWriter(dm, 'vol0', bytes, qd, seed);
    let backoffSeen = false;
    if (solo) await sleep(2000);
    else {
      for (;;) {
        const s = siteOf(dm);
        if (s.resyncFlow?.backoff) backoffSeen = true;
        if (/(^| )1:A,/.test(dm.status('repl')[0]!.params) && s.resyncedBytes >= bytes) break;
        await sleep(5);
      }
    }
    const seconds = (performance.now() - start) / 1000;
    const lat = (await writer?.stop()) ?? [];
    return {
      seconds, bytes, writes: lat.length, p50us: pct(lat, 50), p99us: pct(lat, 99), resyncedBytes: siteOf(dm).resyncedBytes, backoffSeen,
    };
  } finally {
    await dm.close();
  }
}

export const rs: Suite = {
  id: 'RS',
  description: 'library: full resync vs the copy service\'s raw speed (copyRanges file → file), alone and under a writer; the writer\'s latency, auto vs fixed',
  method:
    'In the bench process (tools/bench/r-resync.ts). Per pair, order rotating: copyRanges of the whole device file → file ' +
    '(1 MiB chunks, 4 regions in flight, flush at the end); a group (blockdev site over a second image, 4 MiB log, a new ' +
    '`disk` dirty log: every region out of sync) timed from creating the replicator-dev to `1:A,0,0`, resync-rate auto, ' +
    'without and with a writer (4 KiB random writes, rsqd in flight, all through the resync), and with the writer under ' +
    '`resync-rate 0` (fixed, unlimited: the copy as before the controller); the writer alone on an in-sync group for 2 s. ' +
    'Images in the page cache (written just before); the remote image rewritten with zeroes before each run.',
  async run(ctx: BenchContext): Promise<Row[]> {
    const bytes = Math.floor(size(ctx, 'rssize', ctx.quick ? 32 << 20 : 128 << 20) / (1 << 20)) * (1 << 20);
    const region = int(ctx, 'rsregion', 1024);
    const qd = Math.max(1, int(ctx, 'rsqd', 4));
    const t = (n: string): string => path.join(ctx.tmpdir, n);
    ctx.log(`RS: ${formatSize(bytes)} device, region ${region} sectors, writer 4 KiB random qd${qd}`);
    fill(t('rs-local.img'), bytes, ctx.seed);
    const kinds: Kind[] = ['copy', 'alone', 'writer', 'writer-fixed', 'solo'];
    const got = new Map<Kind, Array<{ r: RsResult; pair: number; position: 0 | 1; load1: number }>>(kinds.map((k) => [k, []]));
    try {
      for (let pair = 0; pair < ctx.pairs; pair++) {
        const order = kinds.map((_, i) => kinds[(i + pair) % kinds.length]!);
        const load1 = os.loadavg()[0]!;
        for (const [i, k] of order.entries()) {
          const r = await runOne(k, t, bytes, region, qd, ctx.seed + pair);
          got.get(k)!.push({ r, pair, position: (i === 0 ? 0 : 1) as 0 | 1, load1 });
          ctx.log(`  RS pair ${pair + 1}/${ctx.pairs} ${k}: ${r.seconds.toFixed(3)} s (${(r.bytes / r.seconds / 1e6).toFixed(0)} MB/s)` +
            (r.writes ? `, writer ${(r.writes / r.seconds).toFixed(0)} IOPS p50 ${r.p50us.toFixed(0)} µs p99 ${r.p99us.toFixed(0)} µs` : '') +
            (k === 'writer' ? `, backoff seen: ${r.backoffSeen}` : '') + `; load ${load1.toFixed(2)}`);
        }
      }
    } finally {
      for (const f of ['rs-local.img', 'rs-remote.img', 'rs-rlog', 'rs-dlog']) fs.rmSync(t(f), { force: true });
    }
    const mk = (k: Kind, value: (r: RsResult) => number): Sample[] => got.get(k)!.map(({ r, pair, position, load1 }) => ({
      value: value(r), ops: r.writes, bytes: r.bytes, seconds: r.seconds, maxRssKiB: null, pair, position, load1,
      writerIops: r.writes / r.seconds, p50us: r.p50us, p99us: r.p99us, resyncedBytes: r.resyncedBytes,
    }));
    const speed = (r: RsResult): number => r.bytes / r.seconds;
    const copy = side('copyRanges', 'copyRanges file → file, 4 regions in flight, flush', mk('copy', speed), null);
    const notes = `device ${formatSize(bytes)}, region ${region} sectors, writer 4 KiB random qd${qd}; solo writer p99 ${median(got.get('solo')!.map((x) => x.r.p99us)).toFixed(0)} µs, ${median(got.get('solo')!.map((x) => x.r.writes / x.r.seconds)).toFixed(0)} IOPS`;
    return [
      row({
        suite: 'RS', id: 'resync-alone', unit: 'MB/s', goal: 0.8, notes,
        description: 'full resync (replicator-dev created → 1:A,0,0), resync-rate auto, no writer, vs copyRanges of the same bytes',
        a: side('resync-auto', 'device bytes / seconds to 1:A,0,0', mk('alone', speed), null), b: copy,
      }),
      row({
        suite: 'RS', id: 'resync-writer', unit: 'MB/s', goal: 0, notes,
        description: 'the same with a writer throughout (auto backs off to one region at a time while it writes) vs copyRanges',
        a: side('resync-auto+writer', 'device bytes / seconds to 1:A,0,0', mk('writer', speed), null), b: copy,
      }),
      row({
        suite: 'RS', id: 'resync-writer-fixed', unit: 'MB/s', goal: 0, notes,
        description: 'the same with `resync-rate 0` (fixed, unlimited, 4 regions in flight) vs copyRanges',
        a: side('resync-fixed0+writer', 'device bytes / seconds to 1:A,0,0', mk('writer-fixed', speed), null), b: copy,
      }),
      row({
        suite: 'RS', id: 'writer-p99', unit: 'µs', lowerIsBetter: true, goal: 0, notes,
        description: 'the writer\'s p99 latency during the resync: auto vs fixed unlimited (lower is better; no goal)',
        a: side('writer-during-auto', 'p99 of the writer\'s 4 KiB writes', mk('writer', (r) => r.p99us), null),
        b: side('writer-during-fixed0', 'p99 of the writer\'s 4 KiB writes', mk('writer-fixed', (r) => r.p99us), null),
      }),
    ];
  },
};

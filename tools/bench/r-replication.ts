/**
 * R1, R3: the replicator through the library (in-process, as L1's dmkit side); the worker
 * is r-worker.ts, the plain-Node references are in r-reference.ts.
 *
 *   R1  `replicator-dev`, async, slink 1 = blockdev onto an image file: a fixed amount of
 *       writes per sample (4× the ring: shipping must keep up), timed until the site has
 *       every byte (`1:A,0,0`), against plain Node doing log append + local + remote writes;
 *       also against `linear` over a file like the local one, same workload.
 *   R3  partial resync after an outage: the site's device is `error` while D bytes are written
 *       in random 4 KiB writes (the ring overflows, the site goes to its dirty log); healed,
 *       `resync 1`; bytes the resync copied against D rounded up to regions, and its time
 *       against plain Node copying the same regions.
 *
 * Options (`--opt key=value`):
 *   ring=64m          R1 replication log size (header included; the ring is 12 KiB less)
 *   bytes=<4×ring>    R1 bytes written per sample
 *   warmupBytes=<ring>  R1 untimed bytes per side when the worker starts
 *   region=1024       R1 dirty-log region in sectors (also the replicator-dev's largest bio:
 *                     1024 = 512 KiB, so a 1 MiB write is two log entries)
 *   refCrc=0|1        R1 reference computes CRC32C of each payload (as the engine's log does)
 *   refCp=1|0         R1 reference checkpoints as the engine does (r-ref-checkpoints.ts: remote
 *                     fdatasync, then a slot written O_DSYNC; every 200 ms and at half a ring)
 *   refFlushMs=0      R1 reference fdatasyncs log and remote every N ms (a diagnostic)
 *   solo=1            R1 peak RSS of a worker running dmkit (and the reference) alone
 *   r3size=256m  r3ring=2m  r3region=128  dirty=4m  r3qd=8   R3 device, log, region, D, writes in flight
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startWorker } from './child.ts';
import { createImage, warmPageCache } from './l1-library.ts';
import { int, row, side, size, zeroFile } from './r-common.ts';
import type { R1Command, R1Files, R1Result, R1SideName, R1Spec, R3Command, R3Files, R3Result, R3Spec } from './r-worker.ts';
import { formatSize } from './size.ts';
import { median } from './stats.ts';
import type { BenchContext, Row, Sample, Side, Suite } from './suite.ts';
import { fmtValue } from './suite.ts';
import type { Pattern } from './workload.ts';

const WORKER = path.join(path.dirname(fileURLToPath(import.meta.url)), 'r-worker.ts');

export const R1_PATTERNS: readonly Pattern[] = [
  { id: 'seq-write-1m-qd8', op: 'write', bs: 1 << 20, qd: 8, access: 'seq' },
  { id: 'rand-write-4k-qd1', op: 'write', bs: 4096, qd: 1, access: 'random' },
  { id: 'rand-write-4k-qd32', op: 'write', bs: 4096, qd: 32, access: 'random' },
];

// ---- R1 ----

export const r1: Suite = {
  id: 'R1',
  description: 'library: replicator-dev async to an image file (blockdev slink) vs plain Node log + local + remote writes',
  method:
    'Library path, one worker process (tools/bench/r-worker.ts) hosting three sides that take turns: dmkit (a group ' +
    '`replicator ringbuffer` over a log file, slink 0 local, slink 1 `blockdev ... async retest=1`; one `replicator-dev` ' +
    'over the local image with slink 1 onto the remote image and a disk dirty log, `nosync`), the reference (plain ' +
    'Node, positional fs.writev/fs.write with callbacks like L1\'s: per request one writev of a 512-byte header and ' +
    'the payload into a log file used as a ring of the same size, then the payload to the local and the remote file ' +
    'in parallel; done when all three are written; with the engine\'s checkpoints unless refCp=0: every 200 ms when ' +
    'written to and at once when half the ring was appended since the last one, the remote file fdatasync-ed, then a ' +
    '4 KiB checkpoint slot written O_DSYNC after the ring, as the engine does with its log and local devices on files ' +
    'of this machine (tools/bench/r-ref-checkpoints.ts, shared with R1-tcp); an append waits while the ring holds more ' +
    'than it can take of entries no finished checkpoint covers, as the engine\'s writers do) and `linear` over a third image through the library. All sides ' +
    'use L1\'s request slots and seeded offsets, `bytes` per sample (default 4x the ring, so the log wraps ~4 times ' +
    'and shipping must keep up), sides in the order dmkit, ref, linear (even pairs) and linear, ref, dmkit (odd). ' +
    'dmkit\'s sample runs from the first request to the status showing slink 1 caught up (`1:A,0,0`, polled every ' +
    'ms once the last write was acknowledged): "replicated"; its "acked" time stops at the last acknowledgement. ' +
    'The reference acknowledges after the remote write, so its one time is both. Every file is fdatasync-ed before ' +
    'every run (untimed) and the images are re-read into the page cache before every pair. ' +
    'RSS: peak of a worker running dmkit alone (warm-up plus one sample), and process.memoryUsage.rss() sampled ' +
    'every 20 ms during every run (in every sample).',
  async run(ctx: BenchContext): Promise<Row[]> {
    const patterns = R1_PATTERNS.filter((p) => ctx.patterns.length === 0 || ctx.patterns.some((f) => p.id.includes(f)));
    if (patterns.length === 0) return [];
    const logBytes = size(ctx, 'ring', ctx.quick ? 16 << 20 : 64 << 20);
    const logSectors = Math.floor(logBytes / 512);
    const perSample = size(ctx, 'bytes', 4 * logBytes);
    const warmBytes = size(ctx, 'warmupBytes', logBytes);
    const region = int(ctx, 'region', 1024);
    const refCrc = ctx.opts.refCrc === '1';
    const refFlushMs = int(ctx, 'refFlushMs', 0);
    const refCp = ctx.opts.refCp !== '0';
    // slink 0's al-extents (the activity log; absent: the default)
    const alExtents = ctx.opts.al === undefined ? null : int(ctx, 'al', 490);
    const solo = ctx.opts.solo !== '0';
    const sectors = Math.floor(ctx.size / 512);
    const span = sectors * 512;
    const t = (n: string): string => path.join(ctx.tmpdir, n);
    const files: R1Files = {
      rlog: t('r1-rlog'), local: t('r1-local.img'), remote: t('r1-remote.img'), dlog: t('r1-dlog'),
      refLog: t('r1-ref-log'), refLocal: t('r1-ref-local.img'), refRemote: t('r1-ref-remote.img'), linear: t('r1-linear.img'),
    };
    const images = [files.local, files.remote, files.refLocal, files.refRemote, files.linear];
    ctx.log(`R1: creating 5 images of ${formatSize(span)}, logs of ${formatSize(logSectors * 512)}; ${formatSize(perSample)} per sample, region ${region} sectors`);
    for (const f of images) createImage(f, span);
    zeroFile(files.refLog, logSectors * 512);
    const resetEngineLogs = (): void => {
      zeroFile(files.rlog, logSectors * 512);
      zeroFile(files.dlog, 1 << 20);
    };
    const spec = (p: Pattern, sides: R1SideName[]): R1Spec => ({
      mode: 'r1', sides, pattern: p, sectors, logSectors, region, files, refCrc, refFlushMs, refCp, alExtents,
      warmupOps: Math.max(p.qd, Math.floor(warmBytes / p.bs)),
    });
    const rows: Row[] = [];
    try {
      for (const p of patterns) {
        const unit: Row['unit'] = p.access === 'seq' ? 'MB/s' : 'IOPS';
        const ops = Math.max(p.qd, Math.floor(perSample / p.bs));
        resetEngineLogs();
        // with checkpoints on, the reference without them runs too (the reported one before the ninth session)
        const sides: R1SideName[] = refCp ? ['dmkit', 'ref', 'ref-nocp', 'linear'] : ['dmkit', 'ref', 'linear'];
        const w = await startWorker<R1Command, R1Result>(WORKER, spec(p, sides), ctx.env);
        const got: Record<R1SideName, Array<{ r: R1Result; pair: number; order: number; load1: number }>> = { dmkit: [], ref: [], 'ref-nocp': [], linear: [] };
        try {
          for (let pair = 0; pair < ctx.pairs; pair++) {
            for (const f of images) warmPageCache(f, span);
            const load1 = os.loadavg()[0]!;
            const order: R1SideName[] = pair % 2 === 0 ? sides : [...sides].reverse();
            for (const [i, s] of order.entries()) got[s].push({ r: await w.run({ side: s, ops, seed: ctx.seed + pair }), pair, order: i, load1 });
            const d = got.dmkit[pair]!.r;
            const rf = got.ref[pair]!.r;
            const ln = got.linear[pair]!.r;
            const nc = got['ref-nocp'][pair]?.r;
            const v = (x: R1Result, secs: number): string => fmtValue(unit === 'MB/s' ? x.bytes / secs : x.ops / secs, unit);
            ctx.log(`  R1 ${p.id} pair ${pair + 1}/${ctx.pairs}: dmkit acked ${v(d, d.ackSeconds)}, replicated ${v(d, d.replSeconds)}, ` +
              `ref ${v(rf, rf.replSeconds)} (${rf.checkpoints} checkpoints)${nc ? `, ref without checkpoints ${v(nc, nc.replSeconds)}` : ''}, linear ${v(ln, ln.replSeconds)} ${unit} (ratio ${(rf.replSeconds / d.replSeconds).toFixed(3)}; ` +
              `site ${d.site!.states}, max lag ${d.site!.maxLagIos} ios, overflows ${d.site!.overflows}, rss ${(d.rssPeakKiB / 1024).toFixed(0)} MiB)`);
          }
        } finally {
          await w.close();
        }
        let soloRss: Partial<Record<R1SideName, number>> = {};
        if (solo) {
          for (const s of ['dmkit', 'ref'] as const) {
            if (s === 'dmkit') resetEngineLogs();
            const sw = await startWorker<R1Command, R1Result>(WORKER, spec(p, [s]), ctx.env);
            try {
              soloRss = { ...soloRss, [s]: (await sw.run({ side: s, ops, seed: ctx.seed })).maxRssKiB };
            } finally {
              await sw.close();
            }
          }
        }
        const samples = (s: R1SideName, first: R1SideName, which: 'ack' | 'repl'): Sample[] => got[s].map(({ r, pair, order, load1 }) => {
          const seconds = which === 'ack' ? r.ackSeconds : r.replSeconds;
          const otherOrder = got[first].find((x) => x.pair === pair)!.order;
          return {
            ...r, value: unit === 'MB/s' ? r.bytes / seconds : r.ops / seconds, seconds, maxRssKiB: r.maxRssKiB,
            pair, position: order < otherOrder ? 0 : 1, load1,
          };
        });
        const rssFrom = 'solo worker (warm-up + one sample)';
        const dmkitSide = (which: 'ack' | 'repl', other: R1SideName): Side => side(
          which === 'ack' ? 'dmkit-acked' : 'dmkit-replicated',
          `replicator-dev async, slink 1 blockdev onto an image file; ${which === 'ack' ? 'first request to last acknowledgement' : 'first request to `1:A,0,0` (the site has everything)'}`,
          samples('dmkit', other, which), soloRss.dmkit ?? null, solo ? rssFrom : undefined);
        const refSide = side('node-log-local-remote', `fs.writev(log: 512-byte header + payload) then fs.write(local) and fs.write(remote) in parallel, callbacks${refCp ? '; engine-like checkpoints (remote fdatasync, then a 4 KiB slot written O_DSYNC; every 200 ms when written to and at half a ring; appends wait for ring space a checkpoint covers)' : ''}${refCrc ? '; CRC32C of the payload' : ''}${refFlushMs ? `; fdatasync of log and remote every ${refFlushMs} ms` : ''}`,
          samples('ref', 'dmkit', 'repl'), soloRss.ref ?? null, solo ? rssFrom : undefined);
        const refNoCpSide = side('node-log-local-remote-no-checkpoints', 'as the reference, without checkpoints: nothing is flushed, the ring is reused with the remote not durable (the reported reference before the ninth session)',
          samples('ref-nocp', 'dmkit', 'repl'), null);
        const linSide = side('dmkit-linear', 'linear over an image like the local one, through the library', samples('linear', 'dmkit', 'repl'), null);
        const what = `${p.access === 'seq' ? 'sequential' : 'random'} write ${formatSize(p.bs)}, ${p.qd} in flight, ${formatSize(ops * p.bs)} per sample, log ${formatSize(logSectors * 512)}`;
        const trace = {
          rssSampledPeakKiB: median(got.dmkit.map((x) => x.r.rssPeakKiB)),
          site: got.dmkit.map((x) => x.r.site),
          settings: { logSectors, region, bytesPerSample: ops * p.bs, refCrc, refFlushMs, refCp, alExtents },
        };
        const notes = `log ${logSectors} sectors, region ${region} sectors, ${ops} requests per sample`;
        rows.push(Object.assign(row({
          suite: 'R1', id: p.id, unit, goal: 0.9, description: `${what}: replicated (until the site has it) vs the reference`,
          a: dmkitSide('repl', 'ref'), b: refSide, notes,
        }), trace));
        rows.push(row({
          suite: 'R1', id: `${p.id}-acked`, unit, goal: 0.9, description: `${what}: acknowledged vs the reference`,
          a: dmkitSide('ack', 'ref'), b: refSide, notes,
        }));
        if (refCp) {
          rows.push(row({
            suite: 'R1', id: `${p.id}-vs-no-checkpoints`, unit, goal: 0, description: `${what}: replicated vs the reference without checkpoints (no goal; the remote is never made durable there)`,
            a: dmkitSide('repl', 'ref-nocp'), b: refNoCpSide, notes,
          }));
        }
        rows.push(row({
          suite: 'R1', id: `${p.id}-vs-linear`, unit, goal: 0, description: `${what}: replicated vs linear (no goal; 3 writes per write against 1)`,
          a: dmkitSide('repl', 'linear'), b: linSide, notes,
        }));
      }
    } finally {
      for (const f of Object.values(files)) fs.rmSync(f, { force: true });
    }
    return rows;
  },
};

// ---- R3 ----

export const r3: Suite = {
  id: 'R3',
  description: 'library: replicator partial resync after an outage: bytes copied vs D rounded to regions, time vs plain Node',
  method:
    'One worker process (tools/bench/r-worker.ts): a group like R1\'s over a small log (opt r3ring, default 2 MiB), the ' +
    'site device `dm:site0` (linear over the remote image, so the outage is the engine\'s own `error` target loaded ' +
    'under it, as test/helpers/replication.ts breakSite does), dirty log `disk` with region r3region. A run: wait ' +
    'until caught up, fdatasync every file, load `error` under the site, write D bytes (opt dirty) in random 4 KiB ' +
    'writes (r3qd in flight, seeded offsets) so the ring overflows and the site goes to its dirty log, wait for the ' +
    'site to show down, load the linear back, then time from `resync 1` (which retests the site at once) to ' +
    '`1:A,0,0`. Bytes copied: the change in status JSON `sites[].resyncedBytes`; D rounded up to regions: the distinct ' +
    'regions the offsets touch x region size. Reference for the time: plain Node copying exactly those regions from ' +
    'a second local image to a second remote image (fs.read then fs.write per chunk of min(region, 1 MiB), 4 regions ' +
    'at once as the engine\'s resync, callbacks) then fdatasync of the copy; dmkit\'s resync also flushes the site at ' +
    'its end. dmkit and the reference alternate (A B, B A, ...), the same offsets per pair.',
  async run(ctx: BenchContext): Promise<Row[]> {
    const ids = ['resync-bytes', 'resync-time'];
    if (ctx.patterns.length > 0 && !ids.some((id) => ctx.patterns.some((f) => id.includes(f)))) return [];
    const span = Math.floor(size(ctx, 'r3size', ctx.quick ? 64 << 20 : 256 << 20) / 512) * 512;
    const sectors = span / 512;
    const logSectors = Math.floor(size(ctx, 'r3ring', 2 << 20) / 512);
    const region = int(ctx, 'r3region', 128);
    const dirty = size(ctx, 'dirty', ctx.quick ? 1 << 20 : 4 << 20);
    const qd = Math.max(1, int(ctx, 'r3qd', 8));
    const t = (n: string): string => path.join(ctx.tmpdir, n);
    const files: R3Files = {
      rlog: t('r3-rlog'), local: t('r3-local.img'), remote: t('r3-remote.img'), dlog: t('r3-dlog'),
      refLocal: t('r3-ref-local.img'), refRemote: t('r3-ref-remote.img'),
    };
    ctx.log(`R3: ${formatSize(span)} device, log ${formatSize(logSectors * 512)}, region ${region} sectors, D = ${formatSize(dirty)} in 4 KiB random writes`);
    for (const f of [files.local, files.remote, files.refLocal, files.refRemote]) createImage(f, span);
    zeroFile(files.rlog, logSectors * 512);
    zeroFile(files.dlog, 1 << 20);
    const spec: R3Spec = { mode: 'r3', sectors, logSectors, region, files, dirtyBytes: dirty, qd };
    const w = await startWorker<R3Command, R3Result>(WORKER, spec, ctx.env);
    const got: { dmkit: Array<{ r: R3Result; position: 0 | 1; load1: number }>; ref: Array<{ r: R3Result; position: 0 | 1; load1: number }> } = { dmkit: [], ref: [] };
    try {
      for (let pair = 0; pair < ctx.pairs; pair++) {
        for (const f of [files.local, files.refLocal]) warmPageCache(f, span);
        const load1 = os.loadavg()[0]!;
        const order = pair % 2 === 0 ? (['dmkit', 'ref'] as const) : (['ref', 'dmkit'] as const);
        for (const [i, s] of order.entries()) got[s].push({ r: await w.run({ side: s, seed: ctx.seed + 1000 + pair }), position: i as 0 | 1, load1 });
        const d = got.dmkit[pair]!.r;
        const rf = got.ref[pair]!.r;
        ctx.log(`  R3 pair ${pair + 1}/${ctx.pairs}: D ${formatSize(d.dirtyBytes)} in ${d.regions} regions (${(d.roundedBytes / 1e6).toFixed(1)} MB rounded), ` +
          `dirty log held ${d.loggedRegions}, overflows ${d.overflows}; resync copied ${(d.resyncedBytes / 1e6).toFixed(1)} MB ` +
          `(x${(d.resyncedBytes / d.roundedBytes).toFixed(3)}) in ${d.seconds.toFixed(3)} s; node copy ${rf.seconds.toFixed(3)} s`);
      }
    } finally {
      await w.close();
      for (const f of Object.values(files)) fs.rmSync(f, { force: true });
    }
    const mk = (s: 'dmkit' | 'ref', value: (r: R3Result) => number): Sample[] => got[s].map(({ r, position, load1 }, pair) => ({
      ...r, value: value(r), ops: r.regions, bytes: r.roundedBytes, seconds: r.seconds, maxRssKiB: r.maxRssKiB, pair, position, load1,
    }));
    const overcopy = got.dmkit.map((x) => x.r.resyncedBytes / x.r.roundedBytes);
    const bytes = {
      regionBytes: region * 512, dirtyBytes: got.dmkit.map((x) => x.r.dirtyBytes), regions: got.dmkit.map((x) => x.r.regions),
      roundedBytes: got.dmkit.map((x) => x.r.roundedBytes), resyncedBytes: got.dmkit.map((x) => x.r.resyncedBytes),
      loggedRegions: got.dmkit.map((x) => x.r.loggedRegions), overflows: got.dmkit.map((x) => x.r.overflows),
      overcopy, overcopyMedian: median(overcopy), overcopyGoal: 1.05,
    };
    const dmkitRss = median(got.dmkit.map((x) => x.r.maxRssKiB));
    const notes = `device ${formatSize(span)}, log ${logSectors} sectors, region ${region} sectors, D ${formatSize(dirty)} (${qd} in flight)`;
    const rows: Row[] = [];
    if (ctx.patterns.length === 0 || ctx.patterns.some((f) => 'resync-bytes'.includes(f))) {
      rows.push(Object.assign(row({
        suite: 'R3', id: 'resync-bytes', unit: 'MB/s', goal: Number((1 / 1.05).toFixed(3)),
        description: 'efficiency = (D rounded up to regions) / bytes the resync copied, both per second of the resync; BENCH.md\'s "copied <= 1.05 x rounded D" is ratio >= 0.952 (overcopy = 1/ratio in `bytes`)',
        a: side('dmkit-needed', 'D rounded up to regions / resync seconds', mk('dmkit', (r) => r.roundedBytes / r.seconds), dmkitRss),
        b: side('dmkit-copied', 'status sites[].resyncedBytes (change over the run) / resync seconds', mk('dmkit', (r) => r.resyncedBytes / r.seconds), dmkitRss),
        notes,
      }), { bytes }));
    }
    if (ctx.patterns.length === 0 || ctx.patterns.some((f) => 'resync-time'.includes(f))) {
      rows.push(row({
        suite: 'R3', id: 'resync-time', unit: 'MB/s', goal: 0,
        description: 'resync (heal + `resync 1` to `1:A,0,0`) vs plain Node copying the same regions + fdatasync; value = D rounded to regions / seconds (no goal in BENCH.md)',
        a: side('dmkit-resync', 'resync 1 → 1:A,0,0 (retest, copy, dirty-log and site flush, checkpoint)', mk('dmkit', (r) => r.roundedBytes / r.seconds), dmkitRss),
        b: side('node-copy-regions', 'fs.read/fs.write of the same regions, 4 at once, then fdatasync', mk('ref', (r) => r.roundedBytes / r.seconds), null),
        notes,
      }));
    }
    return rows;
  },
};

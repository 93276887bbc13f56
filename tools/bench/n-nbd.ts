/**
 * N1–N3: dmkit's NBD export (the daemon serving a `linear` over an image file) against
 * `nbdkit file` on the same file, driven by the same external client; `nbdkit memory`
 * alongside as the protocol ceiling (reported, not a goal).
 *
 *   N1  fio --ioengine=nbd, 1 MiB sequential read and write, iodepth 8
 *   N2  fio --ioengine=nbd, 4 KiB random read and write, iodepth 1 and 32
 *   N3  nbdcopy image → export and export → null:
 *
 * Options (`--opt key=value`):
 *   fioSlice=0.5      seconds per fio run; each side's share of a pair is ctx.seconds split
 *                     into runs of about this length, A and B taking turns (A B B A …)
 *   ceiling=0         skip the nbdkit memory runs
 *   ref=dmkit         development aid: side B is a second dmkit daemon (on a copy of the
 *                     image: an image is flocked) instead of nbdkit, to compare two dmkit
 *                     set-ups side by side; with
 *   warmups=3         N3: untimed copies per server before the pairs (a fresh daemon's
 *                     connection threads run their JIT warm-up over about the first GiB each)
 *   aEnv=K=V[;K=V]    environment for side A's server only (e.g. UV_THREADPOOL_SIZE=2)
 *   bEnv=K=V[;K=V]    environment for side B's server only
 */
import fs from 'node:fs';
import path from 'node:path';
import { createImage, warmPageCache } from './l1-library.ts';
import type { FioJob, Server } from './nbd-tools.ts';
import { procCpuSeconds, procMemKiB, runFio, runOk, startDmkit, startNbdkit, syncFile, toolVersions } from './nbd-tools.ts';
import { formatSize } from './size.ts';
import { median, pairRatios } from './stats.ts';
import type { BenchContext, ComparisonSide, Measurement, Row, Sample, SideRunner, Suite } from './suite.ts';
import { comparePairs, fmtValue } from './suite.ts';

interface FioPattern {
  id: string;
  job: FioJob;
  unit: Row['unit'];
}

const N1_PATTERNS: readonly FioPattern[] = [
  { id: 'seq-read-1m-qd8', job: { rw: 'read', bs: 1 << 20, iodepth: 8 }, unit: 'MB/s' },
  { id: 'seq-write-1m-qd8', job: { rw: 'write', bs: 1 << 20, iodepth: 8 }, unit: 'MB/s' },
];

const N2_PATTERNS: readonly FioPattern[] = [
  { id: 'rand-read-4k-qd1', job: { rw: 'randread', bs: 4096, iodepth: 1 }, unit: 'IOPS' },
  { id: 'rand-write-4k-qd1', job: { rw: 'randwrite', bs: 4096, iodepth: 1 }, unit: 'IOPS' },
  { id: 'rand-read-4k-qd32', job: { rw: 'randread', bs: 4096, iodepth: 32 }, unit: 'IOPS' },
  { id: 'rand-write-4k-qd32', job: { rw: 'randwrite', bs: 4096, iodepth: 32 }, unit: 'IOPS' },
];

/** The ceiling's samples, kept on the row (the report's JSON carries them). */
interface Ceiling {
  name: string;
  detail: string;
  samples: Sample[];
  median: number;
  /** median over pairs of dmkit / ceiling */
  dmkitRatio: number;
  /** median over pairs of reference / ceiling */
  referenceRatio: number;
}

/** what one client run measured (the server's RSS and CPU are added by serverSide) */
interface ClientRun {
  value: number;
  ops: number;
  bytes: number;
  seconds: number;
  [extra: string]: unknown;
}

const RSS_FROM = 'VmHWM of the server process after the last run: its peak over the warm-up and every run of this pattern (a process peak cannot be reset)';

function filtered<T extends { id: string }>(ctx: BenchContext, list: readonly T[]): T[] {
  return list.filter((p) => ctx.patterns.length === 0 || ctx.patterns.some((f) => p.id.includes(f)));
}

/** value of a measurement in the row's unit */
function valueOf(unit: Row['unit'], ops: number, bytes: number, seconds: number): number {
  return unit === 'MB/s' ? bytes / seconds : ops / seconds;
}

type Once = (srv: Server, seconds: number, seed: number) => Promise<ClientRun>;
/** untimed client runs against a freshly started server */
type Warmup = (srv: Server) => Promise<void>;

/**
 * A server-backed side: `start` launches the server and warms it up, each run is one client
 * run against it.
 */
function serverSide(name: string, detail: string, launch: () => Promise<Server>, once: Once, warmup: Warmup): ComparisonSide {
  return {
    name, detail,
    async start(): Promise<SideRunner> {
      const srv = await launch();
      try {
        await warmup(srv);
      } catch (err) {
        await srv.stop();
        throw err;
      }
      return {
        async run({ seconds, seed }) {
          const cpu0 = procCpuSeconds(srv.pid);
          const m = await once(srv, seconds, seed);
          const cpu1 = procCpuSeconds(srv.pid);
          const mem = procMemKiB(srv.pid);
          return {
            ...m,
            maxRssKiB: mem?.hwm ?? null,
            cpuSeconds: cpu0 !== null && cpu1 !== null ? cpu1 - cpu0 : null,
            rssNowKiB: mem?.rss ?? null,
          };
        },
        stop: () => srv.stop(),
      };
    },
  };
}

function fioOnce(ctx: BenchContext, p: FioPattern) {
  return async (srv: Server, seconds: number, seed: number) => {
    const r = await runFio(srv.uri, p.job, seconds, seed, ctx.tmpdir, ctx.env);
    return {
      value: valueOf(p.unit, r.ops, r.bytes, r.seconds),
      ops: r.ops, bytes: r.bytes, seconds: r.seconds,
      clatMeanUs: r.clatMeanUs, fioCpuPercent: r.fioCpuPercent,
    };
  };
}

/** peak RSS per side = the last (largest) VmHWM */
function fixRss(row: Row): void {
  for (const s of [row.a, row.b]) {
    const hwm = s.samples.map((x) => x.maxRssKiB).filter((x): x is number => x !== null);
    s.medianRssKiB = hwm.length ? Math.max(...hwm) : null;
    s.rssFrom = RSS_FROM;
  }
}

function attachCeiling(row: Row, c: Omit<Ceiling, 'median' | 'dmkitRatio' | 'referenceRatio'>): Row & { ceiling: Ceiling } {
  const values = c.samples.map((s) => s.value);
  const byPair = (side: Sample[]): number[] => pairRatios(side.map((s) => s.value), values);
  return Object.assign(row, {
    ceiling: {
      ...c, median: median(values),
      dmkitRatio: median(byPair(row.a.samples)), referenceRatio: median(byPair(row.b.samples)),
    },
  });
}

interface Fixture {
  image: string;
  /** ref=dmkit: side B's copy of the image */
  copy: string | null;
  span: number;
  sectors: number;
  ceiling: Server | null;
}

/** the pre-filled image and, unless ceiling=0, an nbdkit memory export filled with the same data */
async function fixture(ctx: BenchContext, tag: string): Promise<Fixture> {
  const sectors = Math.floor(ctx.size / 512);
  const span = sectors * 512;
  const image = path.join(ctx.tmpdir, `${tag}.img`);
  ctx.log(`${tag}: creating ${formatSize(span)} image ${image}; ${JSON.stringify(toolVersions())}`);
  const secs = createImage(image, span);
  ctx.log(`${tag}: image filled and synced in ${secs.toFixed(1)} s`);
  let ceiling: Server | null = null;
  if (ctx.opts.ceiling !== '0') {
    ceiling = await startNbdkit(ctx.tmpdir, 'memory', [String(span)], ctx.env);
    await runOk('nbdcopy', [image, ceiling.uri], ctx.env);
  }
  let copy: string | null = null;
  if (ctx.opts.ref === 'dmkit') {
    copy = `${image}.b`;
    await runOk('cp', ['--sparse=never', image, copy], ctx.env);
    syncFile(copy);
  }
  return { image, copy, span, sectors, ceiling };
}

async function dropFixture(f: Fixture): Promise<void> {
  await f.ceiling?.stop();
  fs.rmSync(f.image, { force: true });
  if (f.copy) fs.rmSync(f.copy, { force: true });
}

/** `K=V;K=V` → an environment */
function sideEnv(text: string | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const kv of (text ?? '').split(';').filter(Boolean)) {
    const i = kv.indexOf('=');
    if (i <= 0) throw new Error(`expected K=V, got '${kv}'`);
    out[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return out;
}

/**
 * Side A, the dmkit daemon over the image, and side B, `nbdkit file` on the same image or
 * (ref=dmkit) a second dmkit daemon on its copy; aEnv/bEnv add to each side's environment.
 */
function sides(ctx: BenchContext, f: Fixture, once: Once, warmup: Warmup): { dmkit: ComparisonSide; nbdkit: ComparisonSide } {
  const aEnv = { ...ctx.env, ...sideEnv(ctx.opts.aEnv) };
  const bEnv = { ...ctx.env, ...sideEnv(ctx.opts.bEnv) };
  const envText = (e: string | undefined): string => (e ? ` with ${e}` : '');
  const dmkit = serverSide('dmkit', `dmkit daemon (node bin/dmkit.js daemon --foreground) exporting \`0 ${f.sectors} linear ${path.basename(f.image)} 0\` on its nbd.sock${envText(ctx.opts.aEnv)}`,
    () => startDmkit(ctx.tmpdir, 'vol', `0 ${f.sectors} linear ${f.image} 0`, aEnv), once, warmup);
  const nbdkit = f.copy
    ? serverSide('dmkit-b', `a second dmkit daemon on a copy of the image${envText(ctx.opts.bEnv)}`,
      () => startDmkit(ctx.tmpdir, 'vol', `0 ${f.sectors} linear ${f.copy} 0`, bEnv), once, warmup)
    : serverSide('nbdkit-file', `nbdkit -f -U SOCK file ${path.basename(f.image)} (defaults)${envText(ctx.opts.bEnv)}`,
      () => startNbdkit(ctx.tmpdir, 'file', [f.image], bEnv), once, warmup);
  return { dmkit, nbdkit };
}

async function fioSuite(ctx: BenchContext, suite: 'N1' | 'N2', patterns: readonly FioPattern[]): Promise<Row[]> {
  const list = filtered(ctx, patterns);
  if (list.length === 0) return [];
  const f = await fixture(ctx, suite.toLowerCase());
  const sliceSeconds = Number(ctx.opts.fioSlice ?? 0.5);
  const slices = Math.max(1, Math.round(ctx.seconds / sliceSeconds));
  const rows: Row[] = [];
  try {
    for (const p of list) {
      const once = fioOnce(ctx, p);
      const { dmkit, nbdkit } = sides(ctx, f, once, async (srv) => {
        if (ctx.warmupSeconds > 0) await once(srv, ctx.warmupSeconds, 0x5a5a);
      });
      const ceilingSamples: Sample[] = [];
      const write = p.job.rw.endsWith('write');
      const row = await comparePairs(ctx, {
        suite, id: p.id, unit: p.unit, goal: 1.0, slices,
        description: `fio --ioengine=nbd --rw=${p.job.rw} --bs=${formatSize(p.job.bs)} --iodepth=${p.job.iodepth}`,
        a: dmkit, b: nbdkit,
        async beforePair(pair) {
          for (const img of f.copy ? [f.image, f.copy] : [f.image]) {
            if (write) syncFile(img);
            warmPageCache(img, f.span);
          }
          if (f.ceiling) {
            const srv = f.ceiling;
            const cpu0 = procCpuSeconds(srv.pid);
            const m = await once(srv, ctx.seconds, ctx.seed + pair * 1000);
            const cpu1 = procCpuSeconds(srv.pid);
            ceilingSamples.push({ ...m, pair, position: 0, maxRssKiB: procMemKiB(srv.pid)?.hwm ?? null,
              cpuSeconds: cpu0 !== null && cpu1 !== null ? cpu1 - cpu0 : null });
            ctx.log(`  ${p.id} pair ${pair + 1}: nbdkit-memory ${fmtValue(m.value, p.unit)} ${p.unit}`);
          }
        },
        notes: `fio runs of ${(ctx.seconds / slices).toFixed(2)} s, ${slices} per side per pair; hot page cache (image re-read before each pair${write ? ', after an fdatasync' : ''}); ` +
          'server RSS = VmHWM after the last run; cpuSeconds = server CPU (all threads) during the run',
      });
      fixRss(row);
      rows.push(f.ceiling
        ? attachCeiling(row, { name: 'nbdkit-memory', detail: `nbdkit -f -U SOCK memory ${f.span} (filled from the image with nbdcopy); one run of ctx.seconds before each pair`, samples: ceilingSamples })
        : row);
    }
  } finally {
    await dropFixture(f);
  }
  return rows;
}

const FIO_METHOD =
  'One image file in the OS tmpdir (created sparse, filled with pseudo-random data, fdatasync-ed). Per pattern two ' +
  'servers run for the whole comparison, each a process of its own: the dmkit daemon (`node bin/dmkit.js daemon ' +
  '--foreground`, private runtime/state dirs, device `vol` = `linear` over the image, created with the CLI) and ' +
  '`nbdkit -f -U SOCK file IMAGE` (defaults: 16 threads, parallel model). The same fio job (`--ioengine=nbd ' +
  '--uri=nbd+unix:///…?socket=… --time_based --runtime=… --invalidate=0 --norandommap --randseed=<per run, same ' +
  'for both sides> --output-format=json`) runs against each in turns: each side\'s share of a pair is split into ' +
  'fio runs of ~0.5 s (opt fioSlice), A B B A …; each server first gets one untimed fio run of the warm-up length. ' +
  'Before each pair: an fdatasync of the image for write patterns, a full read of the image (hot page cache), then ' +
  'one run of ctx.seconds against `nbdkit memory` (filled from the image) as the protocol ceiling. Writes stay in the page cache. ' +
  'Value = fio\'s io_bytes / its runtime (MB/s) or total_ios / runtime (IOPS). RSS = the server process\'s VmHWM ' +
  'after the last run (the peak over warm-up and all runs of that pattern; it cannot be reset, so each pattern ' +
  'gets fresh server processes). fio and the server share the 2 vCPUs.';

export const n1: Suite = {
  id: 'N1',
  description: 'NBD export, fio 1 MiB sequential read/write at iodepth 8: dmkit daemon vs nbdkit file',
  method: FIO_METHOD,
  run: (ctx) => fioSuite(ctx, 'N1', N1_PATTERNS),
};

export const n2: Suite = {
  id: 'N2',
  description: 'NBD export, fio 4 KiB random read/write at iodepth 1 and 32: dmkit daemon vs nbdkit file',
  method: FIO_METHOD,
  run: (ctx) => fioSuite(ctx, 'N2', N2_PATTERNS),
};

// ---- N3: nbdcopy ----

interface CopyPattern {
  id: string;
  description: string;
  /** nbdcopy arguments given the export's URI and the source image */
  args(uri: string, src: string): string[];
  /** the export is written */
  writes: boolean;
}

const N3_PATTERNS: readonly CopyPattern[] = [
  { id: 'copy-in', description: 'nbdcopy IMAGE → export (export written)', args: (uri, src) => [src, uri], writes: true },
  { id: 'copy-out', description: 'nbdcopy export → null: (export read)', args: (uri) => [uri, 'null:'], writes: false },
];

export const n3: Suite = {
  id: 'N3',
  description: 'nbdcopy image → export and export → null:, dmkit daemon vs nbdkit file',
  method:
    'Two pre-filled image files of the size under test: the source image and the export\'s image. Per direction, ' +
    'the dmkit daemon (`linear` over the export image) and `nbdkit -f -U SOCK file` on the same export image run ' +
    'for the whole comparison; each run is one `nbdcopy` with its defaults (both servers set CAN_MULTI_CONN, so ' +
    'nbdcopy opens one connection per core; no --flush), timed with hrtime from spawn to exit. One run per side ' +
    'per pair (no slices), order alternating between pairs; each server first gets three untimed copies (`--opt warmups=K`: K; a fresh daemon\'s connection threads warm up their JIT over the first GiB or so). Before every ' +
    'run (untimed): fdatasync of the export image when it is written, then a full read of the source and export ' +
    'images (hot page cache). Value = bytes copied / wall seconds; ratio = throughput ratio (= reference time / ' +
    'dmkit time). Before each pair one copy against `nbdkit memory` as the ceiling. RSS = server VmHWM after the ' +
    'last run.',
  async run(ctx: BenchContext): Promise<Row[]> {
    const list = filtered(ctx, N3_PATTERNS);
    if (list.length === 0) return [];
    const warmups = Number(ctx.opts.warmups ?? 3);
    const f = await fixture(ctx, 'n3');
    const src = path.join(ctx.tmpdir, 'n3-src.img');
    createImage(src, f.span);
    const rows: Row[] = [];
    try {
      for (const p of list) {
        const once = async (srv: Server): Promise<ClientRun> => {
          warmPageCache(src, f.span);
          // the export's image (and with ref=dmkit the second daemon's copy: whichever is served)
          for (const img of srv === f.ceiling ? [] : f.copy ? [f.image, f.copy] : [f.image]) {
            if (p.writes) syncFile(img);
            warmPageCache(img, f.span);
          }
          const r = await runOk('nbdcopy', p.args(srv.uri, src), ctx.env);
          return { value: f.span / r.seconds, ops: 1, bytes: f.span, seconds: r.seconds };
        };
        const { dmkit, nbdkit } = sides(ctx, f, once, async (srv) => {
          for (let i = 0; i < warmups; i++) await once(srv);
        });
        const ceilingSamples: Sample[] = [];
        const row = await comparePairs(ctx, {
          suite: 'N3', id: p.id, unit: 'MB/s', goal: 1.0, slices: 1,
          description: `${p.description}, ${formatSize(f.span)}`,
          a: dmkit, b: nbdkit,
          async beforePair(pair) {
            if (!f.ceiling) return;
            const m = await once(f.ceiling);
            ceilingSamples.push({ ...m, pair, position: 0, maxRssKiB: procMemKiB(f.ceiling.pid)?.hwm ?? null });
            ctx.log(`  ${p.id} pair ${pair + 1}: nbdkit-memory ${fmtValue(m.value, 'MB/s')} MB/s`);
          },
          notes: 'one nbdcopy per side per pair, wall time from spawn to exit; hot page cache',
        });
        fixRss(row);
        rows.push(f.ceiling
          ? attachCeiling(row, { name: 'nbdkit-memory', detail: `nbdkit memory ${f.span}, one copy before each pair`, samples: ceilingSamples })
          : row);
      }
    } finally {
      fs.rmSync(src, { force: true });
      await dropFixture(f);
    }
    return rows;
  },
};

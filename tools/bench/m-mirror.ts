/**
 * M1, M2: the `mirror` target through the library (in-process, like L1's dmkit side).
 *
 *   M1  writes to a 2-leg mirror (core log, nosync: no resync runs) vs `linear` on an image
 *       like one leg: 1 MiB sequential, 4 KiB random at 1 and 32 in flight.
 *   M2  full resync of a 2-leg mirror (core log, sync; leg 0 a pre-filled image, leg 1 an
 *       empty file) from resume to the in-sync event vs `cp --sparse=never` of the image;
 *       and (resync-nbd) onto an `nbdkit file` export through the engine's NBD client vs
 *       `nbdcopy` of the image onto the same export.
 *
 * The library path rather than fio over NBD: it measures the mirror and not the NBD server
 * and the client besides (N1/N2 measure those), with less noise.
 *
 * Options (`--opt key=value`):
 *   region=1024       mirror region size in sectors (1024 = 512 KiB, LVM's classic default)
 *   m2Runs=3          M2: copies per side per pair (A B B A …; a pair's value is their total)
 *
 * This file is also the worker process of both suites (run with a spec argument; see child.ts).
 */
import fs from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Worker } from './child.ts';
import { startWorker } from './child.ts';
import { createImage, L1_PATTERNS, warmPageCache } from './l1-library.ts';
import { dmkitFactory, openDmkit } from './lib-sides.ts';
import { run as runCmd, startNbdkit, syncFile, type Server } from './nbd-tools.ts';
import { formatSize } from './size.ts';
import { median, pairRatios } from './stats.ts';
import type { BenchContext, ComparisonSide, Measurement, Row, Sample, SideRunner, Suite } from './suite.ts';
import { comparePairs, fmtValue } from './suite.ts';
import type { IoFactory, Pattern, Slot } from './workload.ts';
import { drive, makeSlots } from './workload.ts';

const SELF = fileURLToPath(import.meta.url);

function regionSectors(ctx: BenchContext): number {
  const r = Number(ctx.opts.region ?? 1024);
  if (!Number.isInteger(r) || r < 8 || (r & (r - 1)) !== 0) throw new Error(`M1/M2: region must be a power of 2 >= 8 sectors, got ${ctx.opts.region}`);
  return r;
}

// ---- M1 ----

/** a side hosted by the M1 worker: a dmkit table, or plain Node fs.write to several files at once */
type M1Target = { kind: 'dmkit'; table: string } | { kind: 'node-files'; files: string[] };

interface M1Spec {
  mode: 'm1';
  targets: M1Target[];
  pattern: Pattern;
  span: number;
  warmupSeconds: number;
}

interface M1Command {
  target: number;
  seconds: number;
  seed: number;
}

interface M1Result {
  ops: number;
  bytes: number;
  seconds: number;
  maxRssKiB: number;
  cpuSeconds: number;
}

/** the plain-Node ceiling of a mirror: the request's buffer written to every file in parallel (callbacks) */
function nodeFilesFactory(files: readonly string[]): IoFactory {
  const fds = files.map((f) => fs.openSync(f, 'r+'));
  return (buf) => {
    let left = 0;
    let failure: unknown;
    let done: (err?: unknown) => void = () => {};
    const cb = (err: NodeJS.ErrnoException | null, n: number): void => {
      if (err) failure ??= err;
      else if (n !== buf.length) failure ??= new Error(`short write: ${n} of ${buf.length} bytes`);
      if (--left === 0) done(failure);
    };
    return (pos, d) => {
      done = d;
      left = fds.length;
      failure = undefined;
      for (const fd of fds) fs.write(fd, buf, 0, buf.length, pos, cb);
    };
  };
}

/** worker: like lib-worker.ts (same driver, slots, warm-up), with the node-files side besides */
async function m1Worker(spec: M1Spec): Promise<void> {
  const p = spec.pattern;
  const sides: Slot[][] = [];
  let n = 0;
  for (const t of spec.targets) {
    const factory = t.kind === 'dmkit' ? dmkitFactory(await openDmkit(t.table, `m1-${n++}`), p) : nodeFilesFactory(t.files);
    sides.push(makeSlots(factory, p));
  }
  if (spec.warmupSeconds > 0) {
    for (let i = 0; i < 4; i++) for (const slots of sides) await drive(slots, p, spec.span, spec.warmupSeconds / 4, 0x5a5a5a5a + i);
  }
  const reply = (x: unknown): void => void process.stdout.write(`${JSON.stringify(x)}\n`);
  reply({ ready: true });
  for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    const cmd = JSON.parse(line) as M1Command;
    const slots = sides[cmd.target];
    if (!slots) throw new Error(`no target ${cmd.target}`);
    const cpu0 = process.cpuUsage();
    const r = await drive(slots, p, spec.span, cmd.seconds, cmd.seed);
    const cpu = process.cpuUsage(cpu0);
    reply({ ...r, maxRssKiB: process.resourceUsage().maxRSS, cpuSeconds: (cpu.user + cpu.system) / 1e6 } satisfies M1Result);
  }
  process.exit(0); // without closing the engine: a close would fdatasync, which the reference does not do
}

interface M1Side {
  name: string;
  detail: string;
  target: M1Target;
}

function toMeasurement(r: M1Result, unit: Row['unit']): Measurement {
  return {
    value: unit === 'MB/s' ? r.bytes / r.seconds : r.ops / r.seconds,
    ops: r.ops, bytes: r.bytes, seconds: r.seconds, maxRssKiB: null, cpuSeconds: r.cpuSeconds,
  };
}

/** every side in one worker process, taking turns (L1's mode=shared) */
function sharedWorker(ctx: BenchContext, p: Pattern, span: number, defs: readonly M1Side[]) {
  let worker: Promise<Worker<M1Command, M1Result>> | null = null;
  let stopped: Promise<void> | null = null;
  const get = (): Promise<Worker<M1Command, M1Result>> => {
    const spec: M1Spec = { mode: 'm1', targets: defs.map((d) => d.target), pattern: p, span, warmupSeconds: ctx.warmupSeconds };
    worker ??= startWorker<M1Command, M1Result>(SELF, spec, ctx.env);
    return worker;
  };
  const side = (i: number, unit: Row['unit']): ComparisonSide => ({
    name: defs[i]!.name,
    detail: defs[i]!.detail,
    async start(): Promise<SideRunner> {
      const w = await get();
      return {
        run: async ({ seconds, seed }) => toMeasurement(await w.run({ target: i, seconds, seed }), unit),
        stop: () => (stopped ??= w.close()),
      };
    },
  });
  return { side, run: async (cmd: M1Command) => (await get()).run(cmd) };
}

/** peak RSS of a worker running one side alone: warm-up plus one run */
async function soloRss(ctx: BenchContext, p: Pattern, span: number, def: M1Side): Promise<number> {
  const spec: M1Spec = { mode: 'm1', targets: [def.target], pattern: p, span, warmupSeconds: ctx.warmupSeconds };
  const w = await startWorker<M1Command, M1Result>(SELF, spec, ctx.env);
  try {
    return (await w.run({ target: 0, seconds: ctx.seconds, seed: ctx.seed })).maxRssKiB;
  } finally {
    await w.close();
  }
}

export const m1: Suite = {
  id: 'M1',
  description: 'library: 2-leg mirror (core log, nosync) vs linear, writes',
  method:
    'Library path (in-process, as L1\'s dmkit side; chosen over fio through NBD for less noise and so that only ' +
    'the mirror differs). Three pre-filled image files of the size under test: legs A and B of the mirror and C for ' +
    'the linear (the linear cannot share leg A: an image file is opened with an exclusive flock). Per pattern one ' +
    'worker process (this file run as a worker) hosts both devices, `0 S mirror core 2 <region> nosync 2 A 0 B 0` ' +
    '(nosync: every region in sync, no resync runs; the core log is in memory, so marking a region costs no I/O) ' +
    'and `0 S linear C 0`, and runs them in turns in slices (A B B A …) with L1\'s driver (tools/bench/workload.ts), ' +
    'buffers and seeded offsets. Also in that worker, reported as the ceiling and not a goal: plain Node writing each ' +
    'request\'s buffer to A and B in parallel (fs.write with callbacks, done when both are), i.e. what any user-space ' +
    '2-leg mirror must do; it runs once (ctx.seconds) before each pair. The three images are fdatasync-ed before ' +
    'each pattern and re-read before each pair (hot page cache). Writes stay in the page cache on every side. ' +
    'RSS: a separate worker running that side alone (warm-up plus one run).',
  async run(ctx: BenchContext): Promise<Row[]> {
    const patterns = L1_PATTERNS.filter((p) => p.op === 'write' && (ctx.patterns.length === 0 || ctx.patterns.some((f) => p.id.includes(f))));
    if (patterns.length === 0) return [];
    const region = regionSectors(ctx);
    const sectors = Math.floor(ctx.size / 512);
    const span = sectors * 512;
    const files = ['m1-leg-a.img', 'm1-leg-b.img', 'm1-linear.img'].map((n) => path.join(ctx.tmpdir, n));
    const [legA, legB, lin] = files as [string, string, string];
    ctx.log(`M1: creating 3 images of ${formatSize(span)}; region ${region} sectors`);
    for (const f of files) createImage(f, span);
    const defs: M1Side[] = [
      {
        name: 'dmkit-mirror',
        detail: `0 ${sectors} mirror core 2 ${region} nosync 2 <legA> 0 <legB> 0`,
        target: { kind: 'dmkit', table: `0 ${sectors} mirror core 2 ${region} nosync 2 ${legA} 0 ${legB} 0` },
      },
      { name: 'dmkit-linear', detail: `0 ${sectors} linear <C> 0`, target: { kind: 'dmkit', table: `0 ${sectors} linear ${lin} 0` } },
      { name: 'node-2-files', detail: 'fs.write of the same buffer to legA and legB in parallel (callbacks)', target: { kind: 'node-files', files: [legA, legB] } },
    ];
    const rows: Row[] = [];
    try {
      for (const p of patterns) {
        for (const f of files) syncFile(f);
        const unit: Row['unit'] = p.access === 'seq' ? 'MB/s' : 'IOPS';
        const w = sharedWorker(ctx, p, span, defs);
        const ceiling: Sample[] = [];
        const row = await comparePairs(ctx, {
          suite: 'M1', id: p.id, unit, goal: 0.9,
          description: `${p.access === 'seq' ? 'sequential' : 'random'} write ${formatSize(p.bs)}, ${p.qd} in flight, region ${formatSize(region * 512)}`,
          a: w.side(0, unit), b: w.side(1, unit),
          beforePair: async (pair) => {
            for (const f of files) warmPageCache(f, span);
            const m = toMeasurement(await w.run({ target: 2, seconds: ctx.seconds, seed: ctx.seed + 7919 * (pair + 1) }), unit);
            ceiling.push({ ...m, pair, position: 0 });
            ctx.log(`  ${p.id} pair ${pair + 1}: node-2-files ${fmtValue(m.value, unit)} ${unit}`);
            for (const f of files.slice(0, 2)) warmPageCache(f, span);
          },
          notes: `library, one worker for all sides; region ${region} sectors`,
        });
        row.a.medianRssKiB = await soloRss(ctx, p, span, defs[0]!);
        row.b.medianRssKiB = await soloRss(ctx, p, span, defs[1]!);
        row.a.rssFrom = row.b.rssFrom = 'solo worker (warm-up + one run)';
        const values = ceiling.map((x) => x.value);
        rows.push(Object.assign(row, {
          ceiling: {
            name: defs[2]!.name, detail: defs[2]!.detail, samples: ceiling, median: median(values),
            dmkitRatio: median(pairRatios(row.a.samples.map((x) => x.value), values)),
            referenceRatio: median(pairRatios(row.b.samples.map((x) => x.value), values)),
          },
        }));
      }
    } finally {
      for (const f of files) fs.rmSync(f, { force: true });
    }
    return rows;
  },
};

// ---- M2 ----

interface M2Spec {
  mode: 'm2';
  src: string;
  /** leg 1: a file (recreated empty for every run) or an NBD URI (written over as it is) */
  dst: string;
  sectors: number;
  region: number;
}

interface M2Command {
  /** flush the device (both legs: fdatasync) after the in-sync event, inside the timing */
  flush: boolean;
}

interface M2Result {
  seconds: number;
  cpuSeconds: number;
  maxRssKiB: number;
  regions: number;
}

/** worker: each command resyncs a fresh mirror onto a fresh empty `dst` */
async function m2Worker(spec: M2Spec): Promise<void> {
  const { DeviceMapper } = await import('../../src/index.ts');
  const dm = new DeviceMapper();
  const span = spec.sectors * 512;
  const table = `0 ${spec.sectors} mirror core 2 ${spec.region} sync 2 ${spec.src} 0 ${spec.dst} 0`;
  let n = 0;
  const reply = (x: unknown): void => void process.stdout.write(`${JSON.stringify(x)}\n`);
  reply({ ready: true });
  for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    const cmd = JSON.parse(line) as M2Command;
    const dstIsFile = !spec.dst.startsWith('nbd');
    if (dstIsFile) createSparse(spec.dst, span);
    warmPageCache(spec.src, span);
    const name = `m2-${++n}`;
    const dev = await dm.create(name);
    await dm.load(name, table);
    const synced = new Promise<void>((resolve) => {
      const on = (): void => {
        if (dm.progress(name) !== null) return;
        dev.off('event', on);
        resolve();
      };
      dev.on('event', on);
    });
    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    await dm.resume(name);
    await synced;
    if (cmd.flush) await dm.flush(name);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const cpu = process.cpuUsage(cpu0);
    const status = dm.status(name).map((l) => l.params).join(' ');
    await dm.remove(name);
    if (dstIsFile) fs.rmSync(spec.dst, { force: true }); // drops the leg's dirty pages unwritten (unless flushed)
    reply({
      seconds, cpuSeconds: (cpu.user + cpu.system) / 1e6, maxRssKiB: process.resourceUsage().maxRSS,
      regions: Math.ceil(spec.sectors / spec.region), status,
    } satisfies M2Result & { status: string });
  }
  process.exit(0);
}

export const m2: Suite = {
  id: 'M2',
  description: 'library: full mirror resync (core log, sync) vs cp --sparse=never',
  method:
    'A pre-filled image of the size under test is the source. dmkit (a worker process, library in-process): per run ' +
    'a fresh empty (sparse, full-size) target file, a device with `0 S mirror core 2 <region> sync 2 SRC 0 DST 0` ' +
    'loaded (untimed), then the time from `resume` until the in-sync event (every region copied; the resync copies ' +
    '4 regions at once in chunks of min(region, 1 MiB)). Reference: `cp --sparse=never SRC NEW` to a file that does ' +
    'not exist yet, timed with hrtime from spawn to exit. The core-log resync never flushes the legs (flushAtEnd ' +
    'is off and a core log\'s flush does no I/O), so the main row (resync) flushes on neither side: both leave ' +
    'the copy in the page cache. The second row (resync-flush) adds, inside the timing, a flush of the mirror ' +
    '(fdatasync of both legs) and an fdatasync of the new file after cp; both then include writing the copy to ' +
    'disk. Before every run the source is re-read (hot page cache); after every run the copy is deleted (dropping ' +
    'dirty pages unwritten). Three runs per side per pair (opt m2Runs), taken in turns A B B A A B; a pair\'s value is bytes over their total time. RSS: the resync worker\'s peak (cp: not measured). ' +
    'resync-nbd: leg 1 is `nbdkit -f -U SOCK file F` (F sparse, full-size, created once per pattern and written over by every run of ' +
    'both sides), reached through the engine\'s NBD client; the reference is `nbdcopy SRC nbd+unix:///?socket=SOCK` onto the same ' +
    'export (nbdcopy\'s defaults: 4 connections), timed from spawn to exit; neither side flushes.',
  async run(ctx: BenchContext): Promise<Row[]> {
    const region = regionSectors(ctx);
    const m2Runs = Math.max(1, Math.round(Number(ctx.opts.m2Runs ?? 3)));
    const sectors = Math.floor(ctx.size / 512);
    const span = sectors * 512;
    const src = path.join(ctx.tmpdir, 'm2-src.img');
    const dst = path.join(ctx.tmpdir, 'm2-leg1.img');
    const cpDst = path.join(ctx.tmpdir, 'm2-cp.img');
    const nbdDst = path.join(ctx.tmpdir, 'm2-nbd-leg1.img');
    const variants = [
      { id: 'resync', flush: false, nbd: false },
      { id: 'resync-flush', flush: true, nbd: false },
      { id: 'resync-nbd', flush: false, nbd: true },
    ].filter((v) => ctx.patterns.length === 0 || ctx.patterns.some((f) => v.id.includes(f)));
    if (variants.length === 0) return [];
    ctx.log(`M2: creating ${formatSize(span)} source image; region ${region} sectors`);
    createImage(src, span);
    const rows: Row[] = [];
    try {
      for (const v of variants) {
        let nbdkit: Server | null = null;
        if (v.nbd) {
          createSparse(nbdDst, span);
          nbdkit = await startNbdkit(ctx.tmpdir, 'file', [nbdDst], ctx.env);
        }
        const legUri = nbdkit?.uri ?? '';
        const resync: ComparisonSide = {
          name: 'dmkit-resync',
          detail: `mirror core 2 ${region} sync${v.nbd ? ', leg 1 on nbdkit file via the NBD client' : ''}, resume → in-sync event${v.flush ? ' → flush (fdatasync both legs)' : ''}`,
          async start(): Promise<SideRunner> {
            const spec: M2Spec = { mode: 'm2', src, dst: v.nbd ? legUri : dst, sectors, region };
            const w = await startWorker<M2Command, M2Result>(SELF, spec, ctx.env);
            if (ctx.warmupSeconds > 0) await w.run({ flush: false });
            return {
              async run() {
                const r = await w.run({ flush: v.flush });
                return { value: span / r.seconds, ops: r.regions, bytes: span, seconds: r.seconds, maxRssKiB: r.maxRssKiB, cpuSeconds: r.cpuSeconds, status: (r as M2Result & { status?: string }).status };
              },
              stop: () => w.close(),
            };
          },
        };
        // the references: one command copying the hot image, timed from spawn to exit (plus
        // an fdatasync of the copy when the row flushes); the warm-up never flushes
        const timedCopy = async (cmd: string, args: string[], flush: boolean): Promise<number> => {
          warmPageCache(src, span);
          const t0 = process.hrtime.bigint();
          const r = await runCmd(cmd, args, ctx.env);
          if (r.code !== 0) throw new Error(`${cmd} failed: ${r.stderr.trim()}`);
          if (flush) syncFile(args[args.length - 1]!);
          return Number(process.hrtime.bigint() - t0) / 1e9;
        };
        const commandSide = (name: string, detail: string, once: (flush: boolean) => Promise<number>, cleanup = (): void => {}): ComparisonSide => ({
          name, detail,
          async start(): Promise<SideRunner> {
            if (ctx.warmupSeconds > 0) await once(false);
            return {
              async run() {
                const seconds = await once(v.flush);
                return { value: span / seconds, ops: 1, bytes: span, seconds, maxRssKiB: null };
              },
              stop: async () => cleanup(),
            };
          },
        });
        const dropCpCopy = (): void => fs.rmSync(cpDst, { force: true });
        const cp = commandSide('cp', `cp --sparse=never SRC NEW${v.flush ? ' + fdatasync(NEW)' : ''}`, async (flush) => {
          dropCpCopy();
          const seconds = await timedCopy('cp', ['--sparse=never', src, cpDst], flush);
          dropCpCopy();
          return seconds;
        }, dropCpCopy);
        const nbdcopy = commandSide('nbdcopy', 'nbdcopy SRC nbd+unix:///?socket=SOCK (the same nbdkit export)',
          () => timedCopy('nbdcopy', [src, legUri], false)); // the NBD row never flushes
        try {
          rows.push(await comparePairs(ctx, {
            suite: 'M2', id: v.id, unit: 'MB/s', goal: 0.8, slices: m2Runs,
            description: `full resync of ${formatSize(span)} (region ${formatSize(region * 512)}) vs ` +
              (v.nbd ? 'nbdcopy, onto an nbdkit file export' : `cp${v.flush ? ', both flushed' : ', neither flushed'}`),
            a: resync, b: v.nbd ? nbdcopy : cp,
            notes: `value = bytes / wall seconds; ${m2Runs} copies per side per pair; region ${region} sectors`,
          }));
        } finally {
          await nbdkit?.stop();
        }
      }
    } finally {
      for (const f of [src, dst, cpDst, nbdDst]) fs.rmSync(f, { force: true });
    }
    return rows;
  },
};

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const spec = JSON.parse(process.argv[2] ?? '') as M1Spec | M2Spec;
  (spec.mode === 'm1' ? m1Worker(spec) : m2Worker(spec)).catch((err: unknown) => {
    process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
    process.exit(1);
  });
}

/** an empty sparse file of `size` bytes (replacing any file there) */
function createSparse(file: string, size: number): void {
  fs.rmSync(file, { force: true });
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, size);
  fs.closeSync(fd);
}

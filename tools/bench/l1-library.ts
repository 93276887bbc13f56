/**
 * L1: the library's `linear` target over an image file against plain Node `fs` on the same
 * file with the same pattern, in worker processes (tools/bench/lib-worker.ts).
 *
 * Options (`--opt key=value`):
 *   ref=callback|promise|filehandle   how the reference issues requests (default callback)
 *   readChunk=0|256k                  the reference splits larger reads into parallel pieces
 *                                     of this size (default 0: one fs.read per request)
 *   mode=shared|split                 both sides in one worker process taking turns (default),
 *                                     or each side in a process of its own
 *   a=dmkit|callback|promise|filehandle  side A (default dmkit); a=<ref's API> is an A/A check
 *                                     of the harness noise, a=promise vs ref=callback shows
 *                                     what one promise per request costs plain Node
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Worker } from './child.ts';
import { startWorker } from './child.ts';
import type { LibRunCommand, LibTarget, LibWorkerResult, LibWorkerSpec, NodeApi } from './lib-worker.ts';
import { formatSize, parseSize } from './size.ts';
import type { BenchContext, ComparisonSide, Measurement, Row, SideRunner, Suite } from './suite.ts';
import { comparePairs } from './suite.ts';
import type { Pattern } from './workload.ts';
import { fillPattern } from './workload.ts';

const WORKER = path.join(path.dirname(fileURLToPath(import.meta.url)), 'lib-worker.ts');

export const L1_PATTERNS: readonly Pattern[] = [
  { id: 'seq-read-1m', op: 'read', bs: 1 << 20, qd: 1, access: 'seq' },
  { id: 'seq-write-1m', op: 'write', bs: 1 << 20, qd: 1, access: 'seq' },
  { id: 'rand-read-4k-qd1', op: 'read', bs: 4096, qd: 1, access: 'random' },
  { id: 'rand-write-4k-qd1', op: 'write', bs: 4096, qd: 1, access: 'random' },
  { id: 'rand-read-4k-qd32', op: 'read', bs: 4096, qd: 32, access: 'random' },
  { id: 'rand-write-4k-qd32', op: 'write', bs: 4096, qd: 32, access: 'random' },
];

/** Create the image sparse, then fill every block so reads return real data. */
export function createImage(file: string, size: number): number {
  const t0 = performance.now();
  const fd = fs.openSync(file, 'w+');
  try {
    fs.ftruncateSync(fd, size);
    const block = Buffer.alloc(1 << 20);
    for (let pos = 0, i = 0; pos < size; pos += block.length, i++) {
      fillPattern(block, i + 1000);
      fs.writeSync(fd, block, 0, Math.min(block.length, size - pos), pos);
    }
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  return (performance.now() - t0) / 1000;
}

/** Read the first `span` bytes through the page cache (128 KiB at a time); returns seconds. */
export function warmPageCache(file: string, span: number): number {
  const t0 = performance.now();
  const buf = Buffer.allocUnsafe(128 << 10);
  const fd = fs.openSync(file, 'r');
  try {
    for (let pos = 0; pos < span; pos += buf.length) fs.readSync(fd, buf, 0, Math.min(buf.length, span - pos), pos);
  } finally {
    fs.closeSync(fd);
  }
  return (performance.now() - t0) / 1000;
}

function syncFile(file: string): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

type Unit = Row['unit'];

function toMeasurement(r: LibWorkerResult, unit: Unit, rss: boolean): Measurement {
  return {
    value: unit === 'MB/s' ? r.bytes / r.seconds : r.ops / r.seconds,
    ops: r.ops, bytes: r.bytes, seconds: r.seconds,
    maxRssKiB: rss ? r.maxRssKiB : null,
    cpuSeconds: r.cpuSeconds,
  };
}

interface SideDef {
  name: string;
  detail: string;
  target: LibTarget;
}

/**
 * mode=shared: one worker process hosts both sides and runs them in turns, so both use the
 * same threads, heap state and CPU placement; only the library code differs.
 */
function sharedSides(ctx: BenchContext, p: Pattern, span: number, unit: Unit, defs: [SideDef, SideDef]): [ComparisonSide, ComparisonSide] {
  let worker: Promise<Worker<LibRunCommand, LibWorkerResult>> | null = null;
  let stopped: Promise<void> | null = null;
  const get = (): Promise<Worker<LibRunCommand, LibWorkerResult>> => {
    const spec: LibWorkerSpec = { targets: defs.map((d) => d.target), pattern: p, span, warmupSeconds: ctx.warmupSeconds };
    worker ??= startWorker<LibRunCommand, LibWorkerResult>(WORKER, spec, ctx.env);
    return worker;
  };
  const side = (i: number): ComparisonSide => ({
    name: defs[i]!.name,
    detail: defs[i]!.detail,
    async start(): Promise<SideRunner> {
      const w = await get();
      return {
        run: async ({ seconds, seed }) => toMeasurement(await w.run({ target: i, seconds, seed }), unit, false),
        stop: () => (stopped ??= w.close()),
      };
    },
  });
  return [side(0), side(1)];
}

/** mode=split: each side in a worker process of its own (per-run RSS, but CPU placement differs) */
function splitSide(ctx: BenchContext, p: Pattern, span: number, unit: Unit, def: SideDef): ComparisonSide {
  return {
    name: def.name,
    detail: def.detail,
    async start(): Promise<SideRunner> {
      const spec: LibWorkerSpec = { targets: [def.target], pattern: p, span, warmupSeconds: ctx.warmupSeconds };
      const w = await startWorker<LibRunCommand, LibWorkerResult>(WORKER, spec, ctx.env);
      return {
        run: async ({ seconds, seed }) => toMeasurement(await w.run({ target: 0, seconds, seed }), unit, true),
        stop: () => w.close(),
      };
    },
  };
}

/** Peak RSS of one side alone: a worker of its own, warm-up plus `seconds` of the pattern. */
async function soloRss(ctx: BenchContext, p: Pattern, span: number, def: SideDef): Promise<number> {
  const spec: LibWorkerSpec = { targets: [def.target], pattern: p, span, warmupSeconds: ctx.warmupSeconds };
  const w = await startWorker<LibRunCommand, LibWorkerResult>(WORKER, spec, ctx.env);
  try {
    return (await w.run({ target: 0, seconds: ctx.seconds, seed: ctx.seed })).maxRssKiB;
  } finally {
    await w.close();
  }
}

export const l1: Suite = {
  id: 'L1',
  description: 'library `linear` over an image file vs Node fs on the same file',
  method:
    'One image file in the OS tmpdir, created sparse, then filled with pseudo-random data and fdatasync-ed. ' +
    'Per pattern, one Node worker process hosts both sides (mode=shared, the default): dmkit (DeviceMapper ' +
    'in-process, table `0 <sectors> linear <image> 0`, one bio per request via MappedDevice.submit) and the ' +
    'reference (the same file opened r+ with Node fs; API per the `ref` option, default positional ' +
    'fs.read/fs.write with callbacks and no promise). Both use the same driver, the same reused buffers (one per ' +
    'request slot) and the same seeded offsets. The worker runs each side untimed for the warm-up (JIT), then ' +
    'the timed slices the parent asks for. Before each pair the parent reads the whole image through the page ' +
    'cache (hot runs: pages idle for ~60 s get evicted on these machines). Writes stay in the page cache ' +
    '(neither side flushes); the image is fdatasync-ed before each pattern. Value = bytes/s (sequential) or ' +
    'requests/s (random). RSS: peak RSS of a separate worker running that side alone (warm-up plus one run) in ' +
    'mode=shared; of the side\'s own worker in mode=split (each side in its own process: per-run RSS, but on a ' +
    'shared 2-vCPU machine the two processes get different CPU luck and even identical sides then differ by ' +
    '0.3-2.6x per pair, see docs/benchmarks.md).',
  async run(ctx: BenchContext): Promise<Row[]> {
    const api = (ctx.opts.ref ?? 'callback') as NodeApi;
    if (!['callback', 'promise', 'filehandle'].includes(api)) throw new Error(`L1: unknown ref=${api}`);
    const mode = ctx.opts.mode ?? 'shared';
    if (mode !== 'shared' && mode !== 'split') throw new Error(`L1: unknown mode=${mode} (shared or split)`);
    const aSide = ctx.opts.a ?? 'dmkit';
    if (!['dmkit', 'callback', 'promise', 'filehandle'].includes(aSide)) throw new Error(`L1: unknown a=${aSide}`);
    const readChunk = parseSize(ctx.opts.readChunk ?? '0');
    const patterns = L1_PATTERNS.filter((p) => ctx.patterns.length === 0 || ctx.patterns.some((f) => p.id.includes(f)));
    if (patterns.length === 0) return [];
    const image = path.join(ctx.tmpdir, 'l1.img');
    const sectors = Math.floor(ctx.size / 512);
    const span = sectors * 512;
    ctx.log(`L1: creating ${formatSize(span)} image ${image}`);
    const fillSeconds = createImage(image, span);
    ctx.log(`L1: image filled and synced in ${fillSeconds.toFixed(1)} s; mode=${mode}, a=${aSide}, ref=${api}`);
    const nodeDef = (name: string, which: NodeApi): SideDef => ({
      name,
      detail: `Node fs ${which === 'callback' ? 'fs.read/fs.write with callbacks' : which === 'promise' ? 'fs.read/fs.write wrapped in one promise each' : 'fs.promises FileHandle.read/write'}` +
        (readChunk ? `; reads > ${readChunk} bytes split into parallel ${readChunk}-byte pieces` : ''),
      target: { kind: 'node', file: image, api: which, readChunk },
    });
    const ref = nodeDef('node-fs', api);
    const dmk: SideDef = aSide === 'dmkit'
      ? { name: 'dmkit', detail: 'DeviceMapper linear, MappedDevice.submit', target: { kind: 'dmkit', table: `0 ${sectors} linear ${image} 0` } }
      : nodeDef(`node-fs-${aSide}`, aSide as NodeApi);
    const rows: Row[] = [];
    try {
      for (const p of patterns) {
        syncFile(image);
        const unit: Unit = p.access === 'seq' ? 'MB/s' : 'IOPS';
        const [a, b] = mode === 'shared'
          ? sharedSides(ctx, p, span, unit, [dmk, ref])
          : [splitSide(ctx, p, span, unit, dmk), splitSide(ctx, p, span, unit, ref)];
        const row = await comparePairs(ctx, {
          suite: 'L1', id: p.id, unit, goal: 0.95,
          description: `${p.access === 'seq' ? 'sequential' : 'random'} ${p.op} ${formatSize(p.bs)}, ${p.qd} in flight`,
          a, b,
          beforePair: () => void warmPageCache(image, span),
          notes: `mode=${mode}, a=${aSide}, ref=${api}`,
        });
        if (mode === 'shared') {
          row.a.medianRssKiB = await soloRss(ctx, p, span, dmk);
          row.b.medianRssKiB = await soloRss(ctx, p, span, ref);
          row.a.rssFrom = row.b.rssFrom = 'solo worker (warm-up + one run)';
        }
        rows.push(row);
      }
    } finally {
      fs.rmSync(image, { force: true });
    }
    return rows;
  },
};

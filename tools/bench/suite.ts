/**
 * What a benchmark suite is and the one way every suite compares dmkit with its reference:
 * alternating runs in pairs, the order swapped every pair (A B, B A, A B, …) so neither side
 * always runs first, then the median of each side and the median of the per-pair ratios.
 * Each side is started once per comparison (its own process) and runs once per pair.
 *
 * A suite (L1, N1–N3, M1/M2, …) is one file exporting a `Suite`; `index.ts` lists them.
 * Its `run` builds `Comparison`s and hands them to `comparePairs`.
 */
import os from 'node:os';
import { median, pairRatios } from './stats.ts';

export interface BenchContext {
  /** short runs for a smoke test */
  readonly quick: boolean;
  /** A/B pairs per comparison */
  readonly pairs: number;
  /** bytes of the image or device under test */
  readonly size: number;
  /** timed seconds per run (one side, one pair) */
  readonly seconds: number;
  /** alternations inside a pair: each run is this many slices, A and B taking turns */
  readonly slices: number;
  /** untimed warm-up seconds when a side starts (JIT, allocations) */
  readonly warmupSeconds: number;
  /** a scratch directory for this invocation, removed afterwards */
  readonly tmpdir: string;
  /** extra environment for every measured process, the same for dmkit and its reference */
  readonly env: Readonly<Record<string, string>>;
  /** suite options from `--opt key=value` */
  readonly opts: Readonly<Record<string, string>>;
  /** only patterns whose id contains one of these (empty: all) */
  readonly patterns: readonly string[];
  readonly seed: number;
  log(msg: string): void;
}

/** One measured run of one side: its Measurement, where it stood in its pair, the load. */
export interface Sample extends Measurement {
  pair: number;
  /** 0: this side started its pair, 1: the other side did */
  position: 0 | 1;
  /** 1-minute load average when the run started (others share the machine) */
  load1?: number;
}

export interface Side {
  name: string;
  /** how this side is run, for the report */
  detail: string;
  samples: Sample[];
  median: number;
  medianRssKiB: number | null;
  /** where medianRssKiB comes from when not from the samples */
  rssFrom?: string;
}

export interface Row {
  suite: string;
  id: string;
  description: string;
  /** how `value` is shown: MB/s = value / 1e6, IOPS = value, µs = value (a latency) */
  unit: 'MB/s' | 'IOPS' | 'µs';
  /** the goal is an upper bound on the ratio (latencies: dmkit / reference ≤ goal) */
  lowerIsBetter?: boolean;
  goal: number;
  /** alternations inside each pair */
  slices: number;
  a: Side;
  b: Side;
  /** a/b per pair, in pair order */
  ratios: number[];
  /** median of `ratios` */
  ratio: number;
  notes?: string;
}

export interface Suite {
  id: string;
  description: string;
  /** free text for the report: what is run, how, and what the reference is */
  method: string;
  run(ctx: BenchContext): Promise<Row[]>;
}

export interface Measurement {
  /** the compared value, higher is better (bytes/s for MB/s rows, ops/s for IOPS rows; µs rows: lower is better) */
  value: number;
  ops: number;
  bytes: number;
  seconds: number;
  /** peak resident set of the process that ran it (KiB), when known */
  maxRssKiB: number | null;
  /** CPU time of that process during the whole run (s), when known */
  cpuSeconds?: number | null;
  [extra: string]: unknown;
}

/** One side of a comparison, started once (e.g. a worker process, a server) and run per pair. */
export interface SideRunner {
  /** one timed run of about `seconds`; `seed` picks the offsets (the same for both sides) */
  run(r: { pair: number; slice: number; seconds: number; seed: number }): Promise<Measurement>;
  stop(): Promise<void>;
}

export interface ComparisonSide {
  name: string;
  detail: string;
  start(): Promise<SideRunner>;
}

export interface Comparison {
  suite: string;
  id: string;
  description: string;
  unit: Row['unit'];
  goal: number;
  a: ComparisonSide;
  b: ComparisonSide;
  /**
   * Alternations inside one pair (default ctx.slices): each side's run of a pair is made of
   * this many short runs, A and B taking turns (A B B A A B …). 1 for sides that cannot run
   * in short slices (e.g. an external tool with a start-up cost).
   */
  slices?: number;
  /** untimed preparation before each pair (e.g. re-warm the page cache) */
  beforePair?(pair: number): Promise<void> | void;
  notes?: string;
}

function combine(parts: Measurement[], unit: Row['unit']): Measurement {
  let ops = 0;
  let bytes = 0;
  let seconds = 0;
  let cpu: number | null = 0;
  let rss: number | null = null;
  for (const m of parts) {
    ops += m.ops;
    bytes += m.bytes;
    seconds += m.seconds;
    cpu = cpu === null || m.cpuSeconds == null ? null : cpu + m.cpuSeconds;
    if (m.maxRssKiB !== null) rss = Math.max(rss ?? 0, m.maxRssKiB);
  }
  const value = unit === 'MB/s' ? bytes / seconds : ops / seconds;
  return parts.length === 1
    ? parts[0]!
    : { value, ops, bytes, seconds, maxRssKiB: rss, cpuSeconds: cpu, sliceValues: parts.map((m) => m.value) };
}

/**
 * Start both sides, run `ctx.pairs` pairs, stop both, summarise. In a pair each side runs
 * for `ctx.seconds` in total, split into `slices` short runs taken in turns (A B B A …; the
 * side that starts alternates between pairs), so both sides see the same machine even when
 * other load on it changes from second to second.
 */
export async function comparePairs(ctx: BenchContext, c: Comparison): Promise<Row> {
  const as: Sample[] = [];
  const bs: Sample[] = [];
  const slices = Math.max(1, c.slices ?? ctx.slices);
  const runners: Partial<Record<'a' | 'b', SideRunner>> = {};
  try {
    runners.a = await c.a.start();
    runners.b = await c.b.start();
    for (let pair = 0; pair < ctx.pairs; pair++) {
      await c.beforePair?.(pair);
      const load1 = os.loadavg()[0]!;
      const parts: Record<'a' | 'b', Measurement[]> = { a: [], b: [] };
      for (let slice = 0; slice < slices; slice++) {
        const aFirst = (pair + slice) % 2 === 0;
        const seed = ctx.seed + pair * slices + slice;
        for (const which of aFirst ? (['a', 'b'] as const) : (['b', 'a'] as const)) {
          parts[which].push(await runners[which]!.run({ pair, slice, seconds: ctx.seconds / slices, seed }));
        }
      }
      const first: 0 | 1 = pair % 2 === 0 ? 0 : 1;
      const ma = combine(parts.a, c.unit);
      const mb = combine(parts.b, c.unit);
      as.push({ ...ma, pair, position: first, load1 });
      bs.push({ ...mb, pair, position: first === 0 ? 1 : 0, load1 });
      ctx.log(`  ${c.id} pair ${pair + 1}/${ctx.pairs}: ${c.a.name} ${fmtValue(ma.value, c.unit)}, ` +
        `${c.b.name} ${fmtValue(mb.value, c.unit)} ${c.unit} (ratio ${(ma.value / mb.value).toFixed(3)})`);
    }
  } finally {
    await Promise.allSettled([runners.a?.stop(), runners.b?.stop()]);
  }
  const ratios = pairRatios(as.map((s) => s.value), bs.map((s) => s.value));
  const side = (s: ComparisonSide, samples: Sample[]): Side => {
    const rss = samples.map((x) => x.maxRssKiB).filter((x): x is number => x !== null);
    return {
      name: s.name, detail: s.detail, samples,
      median: median(samples.map((x) => x.value)),
      medianRssKiB: rss.length ? median(rss) : null,
    };
  };
  return {
    suite: c.suite, id: c.id, description: c.description, unit: c.unit, goal: c.goal,
    slices, a: side(c.a, as), b: side(c.b, bs), ratios, ratio: median(ratios),
    ...(c.notes ? { notes: c.notes } : {}),
  };
}

export function fmtValue(v: number, unit: Row['unit']): string {
  return unit === 'MB/s' ? (v / 1e6).toFixed(0) : v.toFixed(0);
}

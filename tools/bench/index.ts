/**
 * `npm run bench -- [options]`: run the benchmark suites, print a Markdown table, write the
 * JSON report. See docs/benchmarks.md for the method and the current numbers.
 *
 *   --only L1[,N1…]        suites to run (default: all; e.g. --only R1,R3 or --only R1-tcp,R2,RC or --only R3,RS)
 *   --patterns a[,b…]      only patterns whose id contains one of these (e.g. rand-read)
 *   --quick                smoke run: 64 MiB, 0.2 s runs, 3 pairs, no report unless --out
 *   --size 1G              image / device size (default 1 GiB)
 *   --pairs 5              A/B pairs per comparison (>= 3 for a report worth keeping)
 *   --seconds 1            timed seconds per run (one side, one pair)
 *   --slices 50            each run is this many slices, A and B taking turns (A B B A …)
 *   --warmup 0.5           untimed seconds per side when it starts
 *   --env KEY=VALUE        environment for every measured process, both sides (repeatable),
 *                          e.g. --env UV_THREADPOOL_SIZE=16 --env UV_USE_IO_URING=1
 *   --opt key=value        suite option (repeatable), e.g. --opt ref=promise
 *   --out FILE             report path (default bench/results/<date>-<suites>-<commit>.json)
 *   --seed N               offsets seed (default 1)
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { l1 } from './l1-library.ts';
import { m1, m2 } from './m-mirror.ts';
import { n1, n2, n3 } from './n-nbd.ts';
import { r4 } from './r-checksum.ts';
import { r1, r3 } from './r-replication.ts';
import { rs } from './r-resync.ts';
import { r2 } from './r-tcp-r2.ts';
import { r1tcp, rc } from './r-tcp.ts';
import { buildReport, defaultOutPath, machine, markdownTable, versions, writeReport } from './report.ts';
import { parseSize, formatSize } from './size.ts';
import type { BenchContext, Row, Suite } from './suite.ts';

/** Every suite, in run order. Add N1–N3, M1/M2, … here as files of their own. */
export const SUITES: readonly Suite[] = [l1, n1, n2, n3, m1, m2, r1, r1tcp, r2, r3, rc, rs, r4];

function keyValues(list: string[] | undefined, what: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const kv of list ?? []) {
    const i = kv.indexOf('=');
    if (i <= 0) throw new Error(`${what} expects KEY=VALUE, got '${kv}'`);
    out[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return out;
}

function num(text: string | undefined, fallback: number, what: string, minimum: number): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isFinite(n) || n < minimum) throw new Error(`--${what} must be a number >= ${minimum}, got '${text}'`);
  return n;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      only: { type: 'string' },
      patterns: { type: 'string' },
      quick: { type: 'boolean', default: false },
      size: { type: 'string' },
      pairs: { type: 'string' },
      seconds: { type: 'string' },
      slices: { type: 'string' },
      warmup: { type: 'string' },
      env: { type: 'string', multiple: true },
      opt: { type: 'string', multiple: true },
      out: { type: 'string' },
      seed: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    const src = fs.readFileSync(new URL(import.meta.url), 'utf8');
    process.stdout.write(`${/\/\*\*([\s\S]*?)\*\//.exec(src)![1]!.replace(/^ \* ?/gm, '').trim()}\n`);
    return;
  }
  const quick = values.quick!;
  const wanted = values.only ? values.only.split(',').map((s) => s.trim().toUpperCase()) : SUITES.map((s) => s.id);
  const suites = wanted.map((id) => {
    const s = SUITES.find((x) => x.id.toUpperCase() === id.toUpperCase());
    if (!s) throw new Error(`unknown suite '${id}' (known: ${SUITES.map((x) => x.id).join(', ')})`);
    return s;
  });
  const tmpdir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-bench-'));
  const cleanup = (): void => fs.rmSync(tmpdir, { recursive: true, force: true });
  process.once('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  const ctx: BenchContext = {
    quick,
    pairs: num(values.pairs, quick ? 3 : 5, 'pairs', 1),
    size: parseSize(values.size ?? (quick ? '64M' : '1G')),
    seconds: num(values.seconds, quick ? 0.3 : 1, 'seconds', 0.01),
    slices: Math.round(num(values.slices, quick ? 5 : 50, 'slices', 1)),
    warmupSeconds: num(values.warmup, quick ? 0.1 : 0.5, 'warmup', 0),
    tmpdir,
    env: keyValues(values.env, '--env'),
    opts: keyValues(values.opt, '--opt'),
    patterns: values.patterns ? values.patterns.split(',').map((s) => s.trim()).filter(Boolean) : [],
    seed: num(values.seed, 1, 'seed', 0),
    log: (msg) => process.stderr.write(`${msg}\n`),
  };
  if (ctx.pairs < 3) ctx.log(`note: ${ctx.pairs} pair(s); the method asks for at least 3`);
  // measure what `npm ci` installs: the bundles (CLI, NBD connection threads) fresh, not the
  // sources compiled at run time by tsx (a stale bundle is skipped; threads then hold more memory)
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
  execFileSync(process.execPath, ['tools/build.mjs'], { cwd: root, stdio: 'inherit' });
  const v = versions();
  const mach = machine(tmpdir); // load average as the run starts
  const started = new Date();
  ctx.log(`dmkit bench: ${suites.map((s) => s.id).join(', ')}; ${formatSize(ctx.size)}, ${ctx.pairs} pairs, ` +
    `${ctx.seconds} s runs in ${ctx.slices} slices, ${ctx.warmupSeconds} s warm-up per side` +
    `${Object.keys(ctx.env).length ? `, env ${JSON.stringify(ctx.env)}` : ''}`);
  const rows: Row[] = [];
  try {
    for (const s of suites) rows.push(...(await s.run(ctx)));
  } finally {
    cleanup();
  }
  const table = markdownTable(rows);
  process.stdout.write(`\n${table}\n\n`);
  if (quick && !values.out) {
    ctx.log('quick run: no report written (give --out to keep one)');
    return;
  }
  const out = values.out ? path.resolve(values.out) : defaultOutPath(suites.map((s) => s.id), v);
  writeReport(out, buildReport({
    started: started.toISOString(),
    finished: new Date().toISOString(),
    argv: process.argv.slice(2),
    machine: mach,
    versions: v,
    settings: {
      quick, pairs: ctx.pairs, slices: ctx.slices, sizeBytes: ctx.size, seconds: ctx.seconds, warmupSeconds: ctx.warmupSeconds,
      env: ctx.env, opts: ctx.opts, patterns: ctx.patterns, seed: ctx.seed, tmpdir: os.tmpdir(),
      inheritedUvEnv: Object.fromEntries(Object.entries(process.env).filter(([k]) => k.startsWith('UV_'))),
    },
    suites,
    rows,
  }));
  ctx.log(`report: ${path.relative(process.cwd(), out)}`);
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});

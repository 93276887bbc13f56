/**
 * The benchmark report: machine, versions, method, settings and every sample as JSON
 * (bench/results/*.json), and a Markdown table of the rows for docs/benchmarks.md.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { REPO_ROOT } from './child.ts';
import { max, min } from './stats.ts';
import type { Row, Suite } from './suite.ts';
import { fmtValue } from './suite.ts';

export interface Machine {
  cpus: number;
  model: string;
  memBytes: number;
  kernel: string;
  os: string;
  arch: string;
  node: string;
  /** filesystem holding the scratch directory, from /proc/mounts */
  tmpFs: string | null;
  /** 1, 5, 15-minute load averages when the run started (the machine is shared) */
  loadavg: number[];
}

export function machine(tmpdir: string): Machine {
  const cpus = os.cpus();
  return {
    cpus: cpus.length,
    model: cpus[0]?.model ?? 'unknown',
    memBytes: os.totalmem(),
    kernel: os.release(),
    os: `${os.type()} ${os.version()}`,
    arch: os.arch(),
    node: process.version,
    tmpFs: mountOf(tmpdir),
    loadavg: os.loadavg(),
  };
}

function mountOf(dir: string): string | null {
  try {
    let best: string[] | null = null;
    for (const line of fs.readFileSync('/proc/mounts', 'utf8').split('\n')) {
      const f = line.split(' ');
      if (f.length < 3) continue;
      const mp = f[1]!;
      if ((dir === mp || dir.startsWith(mp.endsWith('/') ? mp : `${mp}/`)) && (!best || mp.length > best[1]!.length)) best = f;
    }
    return best ? `${best[2]} (${best[0]} on ${best[1]})` : null;
  } catch {
    return null;
  }
}

function git(args: string[]): string | null {
  try {
    return execFileSync('git', args, { cwd: REPO_ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return null;
  }
}

function pkgVersion(file: string): string | null {
  try {
    return (JSON.parse(fs.readFileSync(file, 'utf8')) as { version?: string }).version ?? null;
  } catch {
    return null;
  }
}

export interface Versions {
  dmkit: string | null;
  commit: string | null;
  /** files changed against the commit when the run started (new reports in bench/results/ not counted) */
  uncommittedChanges: number | null;
  node: string;
  v8: string;
  uv: string;
  tsx: string | null;
}

export function versions(): Versions {
  const status = git(['status', '--porcelain']);
  return {
    dmkit: pkgVersion(path.join(REPO_ROOT, 'package.json')),
    commit: git(['rev-parse', 'HEAD']),
    uncommittedChanges: status === null ? null : status.split('\n').filter((l) => l && !l.startsWith('?? bench/results/')).length,
    node: process.versions.node,
    v8: process.versions.v8,
    uv: process.versions.uv,
    tsx: pkgVersion(path.join(REPO_ROOT, 'node_modules/tsx/package.json')),
  };
}

export const METHOD =
  'dmkit and its reference run alternately on the same data in the same invocation, each side in its own ' +
  'long-lived worker process. A comparison is `pairs` pairs; in a pair each side runs for `seconds` in total, ' +
  'split into `slices` short runs taken in turns (A B B A A B ...), and the side that starts alternates between ' +
  'pairs, so both sides see the same machine even when other load on it changes from second to second. ' +
  'A sample is one side\'s total over one pair. Reported: the median of each side, the median of the per-pair ' +
  'ratios dmkit/reference (higher is better; >= 1.0 means dmkit is as fast), the min-max of those ratios, and the ' +
  'median peak RSS of each side\'s worker.';

export interface Report {
  kind: 'dmkit-bench';
  version: 1;
  started: string;
  finished: string;
  argv: string[];
  machine: Machine;
  versions: Versions;
  method: string;
  settings: Record<string, unknown>;
  suites: Array<{ id: string; description: string; method: string }>;
  rows: Row[];
}

export function buildReport(r: Omit<Report, 'kind' | 'version' | 'method' | 'suites'> & { suites: readonly Suite[] }): Report {
  return {
    kind: 'dmkit-bench',
    version: 1,
    ...r,
    method: METHOD,
    suites: r.suites.map((s) => ({ id: s.id, description: s.description, method: s.method })),
  };
}

const mib = (kib: number | null): string => (kib === null ? '–' : `${(kib / 1024).toFixed(0)}`);

export function markdownTable(rows: readonly Row[]): string {
  const out = [
    '| suite | pattern | unit | dmkit | reference | ratio (median of pairs) | ratio min–max | goal | RSS MiB dmkit / ref |',
    '|---|---|---|---:|---:|---:|---:|---:|---:|',
  ];
  for (const r of rows) {
    const ok = !r.goal || (r.lowerIsBetter ? r.ratio <= r.goal : r.ratio >= r.goal) ? '' : ' ✗';
    out.push(`| ${r.suite} | ${r.id} | ${r.unit} | ${fmtValue(r.a.median, r.unit)} | ${fmtValue(r.b.median, r.unit)} | ` +
      `**${r.ratio.toFixed(3)}**${ok} | ${min(r.ratios).toFixed(2)}–${max(r.ratios).toFixed(2)} | ${r.goal ? `${r.lowerIsBetter ? '≤' : '≥'} ${r.goal}` : '—'} | ` +
      `${mib(r.a.medianRssKiB)} / ${mib(r.b.medianRssKiB)} |`);
  }
  return out.join('\n');
}

export function writeReport(file: string, report: Report): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
}

/** bench/results/<date>-<suites>-<commit>[+N].json, not overwriting an earlier report */
export function defaultOutPath(suiteIds: readonly string[], v: Versions): string {
  const date = new Date().toISOString().slice(0, 10);
  const id = `${suiteIds.join('-')}-${v.commit?.slice(0, 7) ?? 'nogit'}${v.uncommittedChanges ? '-dirty' : ''}`;
  const dir = path.join(REPO_ROOT, 'bench/results');
  let file = path.join(dir, `${date}-${id}.json`);
  for (let i = 2; fs.existsSync(file); i++) file = path.join(dir, `${date}-${id}-${i}.json`);
  return file;
}

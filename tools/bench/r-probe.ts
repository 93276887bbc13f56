/**
 * What the replication workers (r-worker.ts, r-tcp-worker.ts, r-tcp-rx.ts) share inside
 * their processes: the untimed fdatasync before a run, waiting for a group's slink 1 to
 * catch up, and the probes around a run (RSS and site-lag sampler, GC pauses).
 */
import fs from 'node:fs';
import { PerformanceObserver } from 'node:perf_hooks';
import type { DeviceMapper } from '../../src/index.ts';

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** fdatasync every file (untimed before a run); returns the seconds it took */
export function syncAll(files: readonly string[]): number {
  const t0 = performance.now();
  for (const f of files) {
    const fd = fs.openSync(f, 'r+');
    try {
      fs.fdatasyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }
  return (performance.now() - t0) / 1000;
}

/** the group's status shows slink 1 with nothing left to ship (`1:A,0,0`, or `1:S,0,0`) */
export function caughtUp(dm: DeviceMapper, group: string): boolean {
  return /(^| )1:[AS],0,0( |$)/.test(dm.status(group)[0]!.params);
}

/** polls every ms until caughtUp; the error names the group's status (and the volume's, when given) */
export async function waitCaughtUp(dm: DeviceMapper, group: string, ms: number, vol?: string): Promise<void> {
  const end = Date.now() + ms;
  while (!caughtUp(dm, group)) {
    if (Date.now() > end) {
      throw new Error(`${group}: slink 1 not caught up after ${ms / 1000} s: status '${dm.status(group)[0]!.params}'` +
        `${vol ? `, ${vol} '${dm.status(vol)[0]!.params}'` : ''}`);
    }
    await sleep(1);
  }
}

/** the group's status JSON: its overflow count and slink 1's entry in sites[] */
export function slink1<S extends { slink: number }>(dm: DeviceMapper, group: string): { overflows: number; site: S } {
  const d = dm.status(group)[0]!.detail as { statistics: { overflows: number }; sites: S[] };
  return { overflows: d.statistics.overflows, site: d.sites.find((x) => x.slink === 1)! };
}

export interface SampledTrace {
  rssPeakKiB: number;
  /** slink 1's state characters seen (A, R, D, …) */
  states: string;
  maxLagIos: number;
  maxLagSectors: number;
  maxRing: number;
}

/** samples RSS (and slink 1's lag in the group's status line when `dm` is given) every 20 ms until stopped */
export function sampler(dm: DeviceMapper | null, group: string): { stop(): SampledTrace } {
  let rss = process.memoryUsage.rss();
  const states = new Set<string>();
  let maxLagIos = 0;
  let maxLagSectors = 0;
  let maxRing = 0;
  const take = (): void => {
    rss = Math.max(rss, process.memoryUsage.rss());
    if (!dm) return;
    const m = /(?:^| )1:([A-Z]),(\d+),(\d+) (\d+)\/\d+/.exec(dm.status(group)[0]!.params);
    if (!m) return;
    states.add(m[1]!);
    maxLagIos = Math.max(maxLagIos, Number(m[2]));
    maxLagSectors = Math.max(maxLagSectors, Number(m[3]));
    maxRing = Math.max(maxRing, Number(m[4]));
  };
  const timer = setInterval(take, 20);
  return {
    stop() {
      clearInterval(timer);
      take();
      return { rssPeakKiB: Math.round(rss / 1024), states: [...states].join(''), maxLagIos, maxLagSectors, maxRing };
    },
  };
}

/** garbage collections: count and total pause ms (major: mark-compact) */
export interface GcStats { count: number; ms: number; major: number; majorMs: number }

/** GC pauses from now until stopped (perf_hooks 'gc' entries; kind 4 = mark-compact) */
export function gcWatch(): { stop(): GcStats } {
  const gc = { count: 0, ms: 0, major: 0, majorMs: 0 };
  const add = (list: readonly PerformanceEntry[]): void => {
    for (const e of list) {
      gc.count++;
      gc.ms += e.duration;
      if ((e as PerformanceEntry & { detail?: { kind?: number } }).detail?.kind === 4) {
        gc.major++;
        gc.majorMs += e.duration;
      }
    }
  };
  const obs = new PerformanceObserver((list) => add(list.getEntries()));
  obs.observe({ entryTypes: ['gc'] });
  return {
    stop() {
      add(obs.takeRecords());
      obs.disconnect();
      return { count: gc.count, ms: Math.round(gc.ms), major: gc.major, majorMs: Math.round(gc.majorMs) };
    },
  };
}

/** what a worker's run of one side reports, R1's (r-worker.ts) and R1-tcp's, R2's and RC's (r-tcp-worker.ts) */
export interface RunResult<S extends string = string> {
  side: S;
  ops: number;
  bytes: number;
  /** first request issued → last request acknowledged */
  ackSeconds: number;
  /** first request issued → the site has everything (dmkit async); = ackSeconds for the others */
  replSeconds: number;
  cpuSeconds: number;
  maxRssKiB: number;
  /** peak of process.memoryUsage.rss() sampled every 20 ms during this run */
  rssPeakKiB: number;
  /** the untimed fdatasync of the side's files before the run */
  syncSeconds: number;
  /** garbage collections during the run */
  gc: GcStats;
}

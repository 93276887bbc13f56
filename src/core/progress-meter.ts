/**
 * Progress as the engine shows it: a device's background work (resync, verify) sampled
 * over time, with a measured rate and ETA, and figures that never go backwards within a
 * run (docs/core.md "Progress").
 *
 * A target reports what it knows (`Progress`: done and total sectors). A replicator's total
 * is fixed while writes dirty regions already copied, so its `done` can drop; the meter
 * only trusts what remains (total − done):
 *
 *   - a run starts at the first sample with work, and ends at a sample without work, a
 *     change of work, work appearing again after nothing remained, or no sample for GAP_MS;
 *   - done starts at the target's done and grows by every drop of what remains, never
 *     shrinking; total = done + what remains now (it grows when writes make more work);
 *   - percent = ⌊100·done/total⌋, held at its highest in the run, 100 only when nothing remains;
 *   - rate = done bytes per second between the oldest and newest sample of the last
 *     WINDOW_MS; eta = what remains at that rate (null while the rate is 0).
 */
import type { Progress, ProgressReport } from './types.ts';

/** the rate is measured over this much time */
export const WINDOW_MS = 10_000;
/** no sample for this long: the next one starts a new run */
const GAP_MS = 5_000;
/** how often the sampler looks at devices with work */
export const SAMPLE_MS = 500;

interface Run {
  work: string;
  done: number;
  remaining: number;
  percent: number;
  /** (time, done) samples, oldest first, reaching just past WINDOW_MS back */
  times: number[];
  dones: number[];
}

export class ProgressMeter {
  #run: Run | null = null;

  /** true while a run is open (the last sample had work) */
  get running(): boolean {
    return this.#run !== null;
  }

  /** Feed what the target reports now; returns the report, or null when no work runs (the run ends). */
  sample(p: Progress | null, now = Date.now()): ProgressReport | null {
    if (!p || p.totalSectors <= 0) {
      this.#run = null;
      return null;
    }
    const remaining = Math.max(0, p.totalSectors - Math.max(0, p.doneSectors));
    let run = this.#run;
    const last = run ? run.times[run.times.length - 1]! : 0;
    if (!run || run.work !== p.work || (run.remaining === 0 && remaining > 0) || now - last > GAP_MS) {
      run = { work: p.work, done: Math.min(p.totalSectors, Math.max(0, p.doneSectors)), remaining, percent: 0, times: [], dones: [] };
      this.#run = run;
    } else if (remaining < run.remaining) {
      run.done += run.remaining - remaining;
    }
    run.remaining = remaining;
    this.#keep(run, now);
    const total = run.done + remaining;
    const exact = remaining === 0 ? 100 : Math.min(99, Math.floor((run.done * 100) / total));
    run.percent = Math.max(run.percent, exact);
    const rate = this.#rate(run);
    const eta = remaining === 0 ? 0 : rate > 0 ? Math.round((remaining * 512 * 10) / rate) / 10 : null;
    return { work: run.work, doneSectors: run.done, totalSectors: total, percent: run.percent, rate, eta };
  }

  #keep(run: Run, now: number): void {
    const n = run.times.length;
    if (n && run.times[n - 1]! >= now) {
      run.dones[n - 1] = run.done; // same instant: the newer figure
    } else {
      run.times.push(now);
      run.dones.push(run.done);
    }
    // keep one sample at or before the window's start, so the span covers the whole window
    let drop = 0;
    while (drop + 1 < run.times.length && run.times[drop + 1]! <= now - WINDOW_MS) drop++;
    if (drop) {
      run.times.splice(0, drop);
      run.dones.splice(0, drop);
    }
  }

  /** bytes per second over the samples kept (0 with fewer than two) */
  #rate(run: Run): number {
    const n = run.times.length;
    if (n < 2) return 0;
    const ms = run.times[n - 1]! - run.times[0]!;
    return ms > 0 ? Math.round(((run.dones[n - 1]! - run.dones[0]!) * 512 * 1000) / ms) : 0;
  }
}

/**
 * One meter per device, and a timer that samples every device while any has work, so
 * that the rate is measured before anyone asks (`status --json` once) and runs are not
 * cut by long gaps between questions. `wake` (a device event: a resync may have started)
 * starts it; it stops itself when no device has work. The timer does not keep the
 * process alive.
 */
export class ProgressSampler<D extends object> {
  readonly #meters = new WeakMap<D, ProgressMeter>();
  readonly #read: (dev: D) => Progress | null;
  readonly #devices: () => Iterable<D>;
  #timer: NodeJS.Timeout | null = null;

  constructor(read: (dev: D) => Progress | null, devices: () => Iterable<D>) {
    this.#read = read;
    this.#devices = devices;
  }

  /** sample `dev` now and return its report (null: no work) */
  sample(dev: D): ProgressReport | null {
    let m = this.#meters.get(dev);
    if (!m) this.#meters.set(dev, (m = new ProgressMeter()));
    const r = m.sample(this.#read(dev));
    if (r) this.#start();
    return r;
  }

  /** something happened: sample soon, and keep sampling while any device has work */
  wake(): void {
    this.#start();
  }

  #start(): void {
    if (this.#timer) return;
    this.#timer = setInterval(() => this.#tick(), SAMPLE_MS);
    this.#timer.unref();
  }

  #tick(): void {
    let any = false;
    for (const d of this.#devices()) if (this.sample(d)) any = true;
    if (!any) this.stop();
  }

  stop(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
  }
}

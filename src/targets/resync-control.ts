/**
 * Resync rate control (REPLICATION.md "Resync, verify, seeding"): one knob, `resync-rate`.
 *
 *   auto (default)  keep a target amount of resync data in flight per site, adapted to
 *                   what the copies measure (throughput, a range's latency); while the
 *                   group's application writes are in flight, back off to one range in
 *                   flight, and while they are also slow, to a floor rate as well.
 *   <N>[k|m|g]      fixed: at most N bytes per second per site, 4 ranges in flight (the
 *                   copy service's pacing); `0` = fixed and unlimited.
 *
 * The group counts its application writes (`appStart`/`appEnd` around a write, after it
 * was admitted: writers held by a resync's last pass are not counted, so that pass runs at
 * full speed). Each site's copy pass takes a `ResyncFlow` and calls it around each range
 * (`acquire` before, `release` after); the copy service reads `rate()` after each range.
 *
 * DRBD's controller (c-plan-ahead, c-fill-target, c-min-rate, c-max-rate) is the model;
 * its six knobs are constants here, explained where they are defined.
 */
import { setMaxListeners } from 'node:events';

/** ranges a copy pass may have in flight at most (the copy service's workers) */
export const MAX_RANGES = 16;
/** ranges in flight in fixed mode (as before there was a controller) */
const FIXED_RANGES = 4;
/** auto: the window starts at this many bytes in flight */
const START_WINDOW = 4 << 20;
/** auto: never more than this in flight per site */
const MAX_WINDOW = 32 << 20;
/** auto: never more in flight than this many seconds of the measured throughput (a write arriving waits behind at most that) */
const FILL_SECONDS = 0.25;
/** auto: a range slower than this many times the fastest recent one shrinks the window */
const SLOW_RANGE = 2;
/** application writes seen within this many ms count as "in flight" (between bursts too) */
const APP_QUIET_MS = 200;
/** application writes slower than this many times their quiet-time latency are "slow"… */
const APP_SLOW = 3;
/** …and slower than this in absolute terms (a 0.1 ms write tripling is no reason to stop) */
const APP_SLOW_MIN_MS = 2;
/** while application writes are slow: resync at this share of its best measured rate… */
const FLOOR_SHARE = 0.1;
/** …but never slower than this (bytes/s), so a resync always moves */
const FLOOR_RATE = 1 << 20;
/** throughput is measured over buckets of this many ms */
const BUCKET_MS = 250;

export type ResyncMode = 'auto' | 'fixed';

const now = (): number => performance.now();

/** Running mean that forgets: weight `w` for a new sample. */
function ewma(old: number, sample: number, w: number): number {
  return old === 0 ? sample : old + (sample - old) * w;
}

/**
 * `resync-rate` argument: `auto`, or bytes per second with an optional binary unit
 * (`k`, `m`, `g`, either case). Returns null for `auto`; throws a message for anything else.
 */
export function parseResyncRate(word: string): number | null {
  if (word === 'auto') return null;
  const m = /^(\d+)([kmg]?)$/i.exec(word);
  if (!m) throw new Error(`invalid resync rate '${word}' (expected auto, or bytes per second: <N>[k|m|g])`);
  const shift = { '': 0, k: 10, m: 20, g: 30 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g'];
  const n = Number(m[1]) * 2 ** shift;
  if (!Number.isSafeInteger(n)) throw new Error(`resync rate '${word}' is too large`);
  return n;
}

export interface ResyncControlJson {
  mode: ResyncMode;
  /** fixed mode: bytes per second (0 = unlimited); auto: null */
  limit: number | null;
  appWrites: { inFlight: number; latencyMs: number; slow: boolean };
}

export interface ResyncFlowJson {
  mode: ResyncMode;
  /** bytes per second measured over the last second or so (0 when nothing is copied) */
  rate: number;
  /** auto: the target bytes in flight now; fixed: null */
  windowBytes: number | null;
  inFlightBytes: number;
  /** why the copy goes slower than it could: application writes in flight, or slow too */
  backoff: 'app-writes' | 'app-writes-slow' | null;
}

/** The group's side: the mode, and its application writes. */
export class ResyncControl {
  #mode: ResyncMode = 'auto';
  #fixed = 0;
  #appInFlight = 0;
  #appSeen = -Infinity;
  #appLatency = 0;
  #appBase = 0;
  readonly #flows = new Map<number, ResyncFlow>();

  get mode(): ResyncMode {
    return this.#mode;
  }

  /** fixed mode's bytes per second (0 = unlimited) */
  get fixedRate(): number {
    return this.#fixed;
  }

  /** `resync-rate <N>[k|m|g]` (fixed) or `resync-rate auto` */
  set(word: string): void {
    const rate = parseResyncRate(word);
    this.#mode = rate === null ? 'auto' : 'fixed';
    this.#fixed = rate ?? 0;
  }

  /** an application write was admitted; pass the result to `appEnd` */
  appStart(): number {
    this.#appInFlight++;
    return (this.#appSeen = now());
  }

  appEnd(started: number): void {
    this.#appInFlight--;
    const t = (this.#appSeen = now());
    const ms = t - started;
    this.#appLatency = ewma(this.#appLatency, ms, 0.1);
    // the quiet-time latency: the fastest recent write, creeping up so it follows a slower device
    this.#appBase = this.#appBase === 0 ? ms : Math.min(ms, this.#appBase * 1.01 + 0.001);
  }

  /** application writes in flight, or seen within APP_QUIET_MS */
  get appBusy(): boolean {
    return this.#appInFlight > 0 || now() - this.#appSeen < APP_QUIET_MS;
  }

  /** busy, and slower than APP_SLOW × their quiet-time latency */
  get appSlow(): boolean {
    return this.appBusy && this.#appLatency > Math.max(APP_SLOW_MIN_MS, APP_SLOW * this.#appBase);
  }

  /** the flow of `slink`'s resync copies (kept across passes and resyncs: what it measured stays) */
  flow(slink: number): ResyncFlow {
    let f = this.#flows.get(slink);
    if (!f) this.#flows.set(slink, (f = new ResyncFlow(this)));
    return f;
  }

  flowStatus(slink: number): ResyncFlowJson {
    return this.flow(slink).status();
  }

  status(): ResyncControlJson {
    return {
      mode: this.#mode,
      limit: this.#mode === 'fixed' ? this.#fixed : null,
      appWrites: { inFlight: this.#appInFlight, latencyMs: round3(this.#appLatency), slow: this.appSlow },
    };
  }
}

/** One site's resync copies: how much may be in flight, and what they measured. */
export class ResyncFlow {
  readonly #ctl: ResyncControl;
  #window = START_WINDOW;
  #inFlight = 0;
  #ranges = 0;
  readonly #started = new Map<number, number>();
  #wake: Array<() => void> = [];
  #rangeBase = 0;
  #rate = 0;
  #best = 0;
  #bucketStart = 0;
  #bucketBytes = 0;
  #last = -Infinity;
  #signal: AbortSignal | null = null;

  constructor(ctl: ResyncControl) {
    this.#ctl = ctl;
  }

  /** copy service workers: the most ranges that can ever be in flight */
  get maxRanges(): number {
    return MAX_RANGES;
  }

  /** bytes the next range may add to those in flight now */
  #limit(): number {
    if (this.#ctl.mode === 'fixed') return Infinity; // counted in ranges instead
    if (this.#ctl.appBusy) return 0; // one range at a time (a range always goes when none is in flight)
    const fill = this.#rate > 0 ? this.#rate * FILL_SECONDS : MAX_WINDOW;
    return Math.min(this.#window, Math.max(fill, 0));
  }

  #mayStart(bytes: number): boolean {
    if (this.#ranges === 0) return true;
    if (this.#ctl.mode === 'fixed') return this.#ranges < FIXED_RANGES;
    return this.#inFlight + bytes <= this.#limit();
  }

  /**
   * Before a range is copied (the copy service's `before`): wait until the flow lets
   * `bytes` more go (a range always goes when none is in flight). Resolves at once once
   * `signal` is aborted. `key` names the range for `release` (its first sector).
   */
  async acquire(key: number, bytes: number, signal?: AbortSignal): Promise<void> {
    if (signal && signal !== this.#signal) setMaxListeners(4 * MAX_RANGES, (this.#signal = signal)); // the copy's paced workers each wait on it
    while (!this.#mayStart(bytes) && !signal?.aborted) {
      // re-checked on every release, and every 50 ms (application writes may have gone quiet)
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, 50);
        function done(): void {
          clearTimeout(timer);
          resolve();
        }
        this.#wake.push(done);
      });
    }
    this.#inFlight += bytes;
    this.#ranges++;
    this.#started.set(key, now());
  }

  /** after the range (the copy service's `after`, also for one that failed) */
  release(key: number, bytes: number): void {
    const t = now();
    const started = this.#started.get(key) ?? t;
    this.#started.delete(key);
    this.#inFlight -= bytes;
    this.#ranges--;
    this.#measure(t, bytes);
    this.#adapt(t - started);
    const w = this.#wake;
    this.#wake = [];
    for (const f of w) f();
  }

  #measure(t: number, bytes: number): void {
    if (t - this.#last > 4 * BUCKET_MS) {
      // idle since: a new measurement (a quiet gap is no measure of throughput)
      this.#bucketStart = t;
      this.#bucketBytes = 0;
    }
    this.#last = t;
    this.#bucketBytes += bytes;
    const span = t - this.#bucketStart;
    if (span >= BUCKET_MS) {
      this.#rate = ewma(this.#rate, (this.#bucketBytes * 1000) / span, 0.5);
      if (!this.#ctl.appBusy) this.#best = Math.max(this.#best * 0.99, this.#rate);
      this.#bucketStart = t;
      this.#bucketBytes = 0;
    }
  }

  /** auto mode's window: grow by a range while ranges are as fast as the fastest recent one, shrink when they slow down */
  #adapt(ms: number): void {
    this.#rangeBase = this.#rangeBase === 0 ? ms : Math.min(ms, this.#rangeBase * 1.02 + 0.01);
    if (this.#ctl.mode === 'fixed' || this.#ctl.appBusy) return;
    const step = Math.max(64 << 10, this.#window / 8);
    if (ms > SLOW_RANGE * this.#rangeBase) this.#window = Math.max(step, this.#window * 0.8);
    else this.#window = Math.min(MAX_WINDOW, this.#window + step);
  }

  /** bytes per second for the copy service's pacing (0 = none) */
  rate(): number {
    if (this.#ctl.mode === 'fixed') return this.#ctl.fixedRate;
    if (!this.#ctl.appSlow) return 0;
    return Math.max(FLOOR_RATE, Math.round(this.#best * FLOOR_SHARE));
  }

  status(): ResyncFlowJson {
    const auto = this.#ctl.mode === 'auto';
    const stale = now() - this.#last > 4 * BUCKET_MS;
    return {
      mode: this.#ctl.mode,
      rate: stale ? 0 : Math.round(this.#rate),
      windowBytes: auto ? Math.round(this.#window) : null,
      inFlightBytes: this.#inFlight,
      backoff: !auto || !this.#ctl.appBusy ? null : this.#ctl.appSlow ? 'app-writes-slow' : 'app-writes',
    };
  }
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

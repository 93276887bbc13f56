/**
 * Copy service (dm-kcopyd's role): copies sector ranges from one device to one or more
 * others with bounded concurrency, an optional rate limit and progress reports. Mirror and
 * replicator resync build on it.
 *
 * With a `RegionGate` the copy excludes the device's writes region by region (the region
 * hash's RH_RECOVERING state): a write to a region being copied waits for that copy, and
 * a copy waits for the writes already in flight in its regions.
 */
import type { BlockDev } from './types.ts';
import { DmError, toBlockError, type BlockError } from './errors.ts';
import { EMPTY } from './bio.ts';
import { ioBuffer } from './io-buffer.ts';

export interface CopyRange {
  sector: number;
  sectors: number;
}

export interface CopyProgress {
  doneSectors: number;
  /** sectors to copy in all; 0 when the work comes from a function and no total was given */
  totalSectors: number;
  /** bytes per second since start */
  rate: number;
  /** seconds remaining at the current rate (Infinity when unknown) */
  eta: number;
}

/** A device and the sector of it that range sector 0 maps to. */
export interface CopyEndpoint {
  readonly dev: BlockDev;
  readonly offset: number;
}

/** What became of one range (reported to `after`). */
export interface CopyOutcome {
  /** the source read failed; no destination was written */
  readonly readError: BlockError | null;
  /** per destination, in `dst` order: the write's error, or null when it landed */
  readonly writeErrors: readonly (BlockError | null)[];
}

export interface CopyOptions {
  src: BlockDev | CopyEndpoint;
  dst: readonly (BlockDev | CopyEndpoint)[];
  /** the ranges, or a function handing out the next range (null = no more) as workers free up */
  ranges: readonly CopyRange[] | (() => CopyRange | null);
  /** for progress when `ranges` is a function */
  totalSectors?: number;
  /** largest single I/O in sectors (default 2048 = 1 MiB) */
  chunkSectors?: number;
  /** ranges in flight (default 4) */
  concurrency?: number;
  /** bytes per second, 0 = unlimited; read after every range so callers may change it */
  rate?: () => number;
  onProgress?: (p: CopyProgress) => void;
  /** called before each range: may wait */
  before?: (r: CopyRange) => Promise<void> | void;
  /**
   * called with the range's regions held in `gate`, before it is copied: the parts of it to
   * copy, in order (default: all of it). A checksum resync copies only the blocks whose
   * digests differ. A rejection counts as the range's read error. `after` sees the range.
   */
  select?: (r: CopyRange) => Promise<readonly CopyRange[]>;
  /**
   * called after each range, still holding its regions in `gate`; may wait. Without
   * `continueOnError` only for ranges that landed on every destination.
   */
  after?: (r: CopyRange, outcome: CopyOutcome) => Promise<void> | void;
  /** report I/O errors per range to `after` (the range stops at its first failed chunk) and go on, instead of rejecting */
  continueOnError?: boolean;
  /** exclude writes region by region while a range is copied */
  gate?: RegionGate;
  /** flush every destination at the end (default true) */
  flushAtEnd?: boolean;
  signal?: AbortSignal;
}

const endpoint = (s: BlockDev | CopyEndpoint): CopyEndpoint => ('dev' in s ? s : { dev: s, offset: 0 });

/**
 * Copy every range; resolves with the sectors copied. Each range handed out is one unit:
 * locked in `gate` as a whole, copied in chunks of at most `chunkSectors` one after the
 * other, then reported to `after`. Rejects on the first I/O error (unless
 * `continueOnError`), or with EINTR once aborted; either way only after every range in
 * flight has finished, so nothing is left running.
 */
export async function copyRanges(opts: CopyOptions): Promise<number> {
  const chunk = opts.chunkSectors ?? 2048;
  const concurrency = Math.max(1, opts.concurrency ?? 4);
  const src = endpoint(opts.src);
  const dst = opts.dst.map(endpoint);
  const next = typeof opts.ranges === 'function' ? opts.ranges : fromList(opts.ranges);
  const total = opts.totalSectors ?? (typeof opts.ranges === 'function' ? 0 : opts.ranges.reduce((a, r) => a + r.sectors, 0));
  const ok: CopyOutcome = { readError: null, writeErrors: dst.map(() => null) };
  const pace = new Pacer(opts.rate);
  const started = Date.now();
  let done = 0;
  let stopped = false;

  const copyChunk = async (sector: number, sectors: number, buf: Buffer): Promise<CopyOutcome> => {
    const data = buf.subarray(0, sectors * 512);
    try {
      await src.dev.submit({ op: 'read', sector: sector + src.offset, sectors, data, flags: {} });
    } catch (err) {
      return { readError: toBlockError(err), writeErrors: ok.writeErrors };
    }
    const results = await Promise.allSettled(dst.map((d) =>
      d.dev.submit({ op: 'write', sector: sector + d.offset, sectors, data, flags: {} })));
    if (results.every((x) => x.status === 'fulfilled')) return ok;
    return { readError: null, writeErrors: results.map((x) => (x.status === 'rejected' ? toBlockError(x.reason) : null)) };
  };

  const copyRange = async (r: CopyRange, buf: Buffer): Promise<CopyOutcome> => {
    for (let off = 0; off < r.sectors; ) {
      const n = Math.min(chunk, r.sectors - off);
      const outcome = await copyChunk(r.sector + off, n, buf);
      if (outcome !== ok) return outcome;
      off += n;
      done += n;
      const elapsed = Math.max(1e-3, (Date.now() - started) / 1000);
      const rate = (done * 512) / elapsed;
      const eta = total > done && rate > 0 ? ((total - done) * 512) / rate : total > 0 ? 0 : Infinity;
      opts.onProgress?.({ doneSectors: done, totalSectors: total, rate, eta });
    }
    return ok;
  };

  const work = async (): Promise<void> => {
    const buf = ioBuffer(chunk * 512);
    while (!stopped) {
      if (opts.signal?.aborted) throw new DmError('EINTR', 'copy aborted');
      const r = next();
      if (!r) return;
      await opts.before?.(r);
      const locked = opts.gate ? await opts.gate.lockRange(r.sector, r.sectors) : null;
      try {
        let outcome = ok;
        if (opts.select) {
          try {
            for (const part of await opts.select(r)) {
              if ((outcome = await copyRange(part, buf)) !== ok) break;
            }
          } catch (err) {
            outcome = { readError: toBlockError(err), writeErrors: ok.writeErrors };
          }
        } else {
          outcome = await copyRange(r, buf);
        }
        if (outcome !== ok && !opts.continueOnError) throw outcome.readError ?? outcome.writeErrors.find((e) => e !== null);
        await opts.after?.(r, outcome);
      } finally {
        if (locked) opts.gate!.unlockRange(locked);
      }
      // the rate bounds the image a copy covers: a range whose `select` sent little (or
      // nothing) was still read on both sides to choose, and the disks felt that
      await pace.wait(r.sectors * 512, opts.signal);
    }
  };

  const worker = async (): Promise<void> => {
    try {
      await work();
    } catch (err) {
      stopped = true;
      throw err;
    }
  };

  const results = await Promise.allSettled(Array.from({ length: concurrency }, worker));
  const failure = results.find((x): x is PromiseRejectedResult => x.status === 'rejected');
  if (failure) throw failure.reason;
  if (opts.flushAtEnd ?? true) {
    await Promise.all(dst.map((d) => d.dev.submit({ op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} })));
  }
  return done;
}

function fromList(list: readonly CopyRange[]): () => CopyRange | null {
  let i = 0;
  return () => list[i++] ?? null;
}

/** Keeps bytes per second under a limit that may change at any time (the window restarts when it does). */
class Pacer {
  readonly #limit: (() => number) | undefined;
  #current = 0;
  #since = 0;
  #bytes = 0;

  constructor(limit: (() => number) | undefined) {
    this.#limit = limit;
  }

  /** the limit now; a changed limit starts a new accounting window. Returns it. */
  #check(): number {
    const limit = this.#limit?.() ?? 0;
    if (limit !== this.#current) {
      this.#current = limit;
      this.#since = Date.now();
      this.#bytes = 0;
    }
    return limit;
  }

  /**
   * Account `bytes` and wait until the rate allows them. The wait re-reads the limit every
   * RECHECK_MS, so raising or lifting `resync-rate` takes effect at once, not after a sleep
   * computed at the old rate.
   */
  async wait(bytes: number, signal?: AbortSignal): Promise<void> {
    if (this.#check() <= 0) return;
    this.#bytes += bytes;
    for (;;) {
      const limit = this.#current;
      const delay = this.#since + (this.#bytes / limit) * 1000 - Date.now();
      if (delay <= 0 || signal?.aborted) return;
      await sleep(Math.min(delay, RECHECK_MS), signal);
      if (this.#check() !== limit) return;
    }
  }
}

/** how often a throttled copy looks at its rate limit again */
const RECHECK_MS = 100;

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const done = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done);
  });
}

interface RegionLock {
  /** writes waiting for the copy to finish */
  writers: Array<() => void>;
  /** other copies waiting for this one */
  copiers: Array<() => void>;
  /** the copy waiting for the writes in flight to drain */
  drained: (() => void) | null;
}

/**
 * Region-granular exclusion between copies and writes. Writers bracket each write with
 * `tryEnter`/`enter` and `leave`; the copy service locks the regions of each range. The
 * count of writes in flight per region (`writes`) is also what a target uses to know
 * that a region is idle.
 */
export class RegionGate {
  readonly regionSectors: number;
  readonly #writes = new Map<number, number>();
  readonly #locks = new Map<number, RegionLock>();

  constructor(regionSectors: number) {
    this.regionSectors = regionSectors;
  }

  regionOf(sector: number): number {
    return Math.floor(sector / this.regionSectors);
  }

  /** Count a write into `region` unless a copy holds it. Never waits: false = call `enter`. */
  tryEnter(region: number): boolean {
    if (this.#locks.has(region)) return false;
    this.#writes.set(region, (this.#writes.get(region) ?? 0) + 1);
    return true;
  }

  /** Wait until no copy holds `region`, then count a write into it. */
  enter(region: number): Promise<void> {
    const lock = this.#locks.get(region);
    if (!lock) {
      this.#writes.set(region, (this.#writes.get(region) ?? 0) + 1);
      return Promise.resolve();
    }
    return new Promise((resolve) => lock.writers.push(resolve));
  }

  /** The write counted by `tryEnter`/`enter` has completed. */
  leave(region: number): void {
    const n = (this.#writes.get(region) ?? 1) - 1;
    if (n > 0) {
      this.#writes.set(region, n);
      return;
    }
    this.#writes.delete(region);
    const lock = this.#locks.get(region);
    if (lock?.drained) {
      const wake = lock.drained;
      lock.drained = null;
      wake();
    }
  }

  /** writes in flight in `region` */
  writes(region: number): number {
    return this.#writes.get(region) ?? 0;
  }

  isLocked(region: number): boolean {
    return this.#locks.has(region);
  }

  /** Hold `region` against new writes; resolves once the writes in flight there are done. */
  async lock(region: number): Promise<void> {
    for (let held = this.#locks.get(region); held; held = this.#locks.get(region)) {
      const h = held;
      await new Promise<void>((resolve) => h.copiers.push(resolve));
    }
    const lock: RegionLock = { writers: [], copiers: [], drained: null };
    this.#locks.set(region, lock);
    if (this.writes(region) > 0) await new Promise<void>((resolve) => (lock.drained = resolve));
  }

  /** Let writes into `region` again (those that waited go first, before another copy). */
  unlock(region: number): void {
    const lock = this.#locks.get(region);
    if (!lock) return;
    this.#locks.delete(region);
    if (lock.writers.length) this.#writes.set(region, this.writes(region) + lock.writers.length);
    for (const w of lock.writers) w();
    for (const c of lock.copiers) c();
  }

  /** lock every region [sector, sector + sectors) touches, in ascending order; returns them */
  async lockRange(sector: number, sectors: number): Promise<{ first: number; last: number }> {
    const first = this.regionOf(sector);
    const last = this.regionOf(sector + sectors - 1);
    for (let r = first; r <= last; r++) await this.lock(r);
    return { first, last };
  }

  unlockRange(range: { first: number; last: number }): void {
    for (let r = range.first; r <= range.last; r++) this.unlock(r);
  }
}

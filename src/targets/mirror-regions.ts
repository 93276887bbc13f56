/**
 * The mirror's region bookkeeping (dm-region-hash's role) and its resync driver.
 *
 * RegionTracker: which regions the mirror has marked dirty in its log, whether each mark
 * is durable yet, and their lazy clearing once idle. Writes in flight per region are
 * counted by the copy service's `RegionGate`, which also makes writes wait for a resync
 * copy of their region.
 */
import { copyRanges, type CopyEndpoint, type CopyOutcome, type RegionGate } from '../core/copy.ts';
import type { DirtyLog } from '../dirtylog/types.ts';

/** how long after a region's last write the tracker looks for idle regions to clear */
const CLEAR_DELAY_MS = 100;

export class RegionTracker {
  readonly #log: DirtyLog;
  readonly #gate: RegionGate;
  readonly #onLogError: (err: unknown) => void;
  /** marked regions not yet cleared → the flush making the mark durable (null once it is) */
  readonly #marked = new Map<number, Promise<boolean> | null>();
  #timer: NodeJS.Timeout | null = null;
  #running = false;

  constructor(log: DirtyLog, gate: RegionGate, onLogError: (err: unknown) => void) {
    this.#log = log;
    this.#gate = gate;
    this.#onLogError = onLogError;
  }

  /**
   * Before a write to an in-sync region (counted in the gate): mark it in the log unless
   * already marked. Returns null when the mark is durable, else a promise that resolves
   * once the log was flushed: true, or false when the log failed.
   */
  markForWrite(region: number): Promise<boolean> | null {
    const state = this.#marked.get(region);
    if (state !== undefined) return state;
    this.#log.markRegion(region);
    const p = this.#log.flush().then(() => true, (err: unknown) => {
      this.#onLogError(err);
      return false;
    });
    this.#marked.set(region, p);
    void p.then(() => {
      if (this.#marked.get(region) === p) this.#marked.set(region, null);
    });
    return p;
  }

  /** A resync copied `region`: it is dirty in the log and may be cleared once idle. */
  recovered(region: number): void {
    if (!this.#marked.has(region)) this.#marked.set(region, null);
    this.schedule();
  }

  /** Look for idle regions to clear soon (after a region's last write completed). */
  schedule(): void {
    if (this.#timer || !this.#running) return;
    this.#timer = setTimeout(() => {
      this.#timer = null;
      void this.clearIdle();
    }, CLEAR_DELAY_MS);
  }

  /**
   * Clear every marked region that is in sync with no write in flight and no copy, then
   * flush the log (which first flushes the legs). Out-of-sync regions stay dirty.
   */
  async clearIdle(): Promise<void> {
    for (const [region, state] of this.#marked) {
      if (state !== null || this.#gate.writes(region) > 0 || this.#gate.isLocked(region)) continue;
      if (!this.#log.inSync(region)) continue;
      this.#log.clearRegion(region);
      this.#marked.delete(region);
    }
    await this.#log.flush().catch(this.#onLogError);
  }

  /** allow timed clearing (resume) */
  start(): void {
    this.#running = true;
  }

  /** no more timed clearing (suspend, destroy); `clearIdle` still works when called */
  stop(): void {
    this.#running = false;
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
  }
}

export interface ResyncOptions {
  log: DirtyLog;
  gate: RegionGate;
  /** target length in sectors (the last region may be short) */
  length: number;
  src: CopyEndpoint;
  dst: CopyEndpoint[];
  /** regions copied at once */
  concurrency: number;
  /** bytes per second, 0 = unlimited (read after every region) */
  rate: () => number;
  signal: AbortSignal;
  /** a region was copied (or failed): the caller records it in the log */
  done(region: number, outcome: CopyOutcome): void;
}

/**
 * Copy every out-of-sync region the log hands out, from `src` to every `dst`, each
 * region locked against writes while it is copied. Resolves when the log has no more
 * work; rejects with EINTR when aborted (after the regions in flight are done).
 */
export function resyncRegions(o: ResyncOptions): Promise<number> {
  const size = o.log.regionSize;
  return copyRanges({
    src: o.src,
    dst: o.dst,
    ranges: () => {
      const region = o.log.getResyncWork();
      if (region === null) return null;
      const sector = region * size;
      return { sector, sectors: Math.min(size, o.length - sector) };
    },
    totalSectors: (o.log.regionCount - o.log.getSyncCount()) * size,
    chunkSectors: Math.min(size, 2048),
    concurrency: o.concurrency,
    rate: o.rate,
    signal: o.signal,
    gate: o.gate,
    continueOnError: true,
    flushAtEnd: false,
    after: (range, outcome) => o.done(range.sector / size, outcome),
  });
}

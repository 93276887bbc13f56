/**
 * What both built-in log types keep in memory (dm-log.c's `log_c`): clean, in-sync and
 * recovering bits (one bit per region each), the resync search position, the in-sync
 * count, and whether the state changed since the last write. Also the argument parsing
 * both share: `<region_size> [sync|nosync]`.
 */
import type { ArgReader } from '../core/args.ts';
import { Bitset } from './bitset.ts';
import type { SyncMode } from './types.ts';

export class RegionState {
  readonly count: number;
  readonly clean: Bitset;
  readonly sync: Bitset;
  readonly recovering: Bitset;
  /** marks since the last write started */
  touchedDirtied = false;
  /** clears since the last write started */
  touchedCleaned = false;
  /** flushData failed: nothing may be recorded clean until the next resume */
  flushFailed = false;
  #syncCount = 0;
  #search = 0;

  /**
   * Every region starts clean; in sync only under `nosync` (the kernel's ctr state).
   * `cleanBytes` places the clean bits (the disk log's I/O buffer); default: own memory.
   */
  constructor(count: number, mode: SyncMode, cleanBytes?: Uint8Array) {
    this.count = count;
    this.clean = new Bitset(count, cleanBytes);
    this.sync = new Bitset(count);
    this.recovering = new Bitset(count);
    this.clean.fill(true);
    this.sync.fill(mode === 'nosync');
    this.#syncCount = mode === 'nosync' ? count : 0;
  }

  isClean(r: number): boolean {
    return this.clean.get(r);
  }

  inSync(r: number): boolean {
    return this.sync.get(r);
  }

  mark(r: number): void {
    this.clean.clear(r);
    this.touchedDirtied = true;
  }

  clear(r: number): void {
    if (this.flushFailed) return;
    this.clean.set(r);
    this.touchedCleaned = true;
  }

  getResyncWork(): number | null {
    while (this.#search < this.count) {
      const r = this.sync.nextClear(this.#search);
      this.#search = r + 1;
      if (r >= this.count) return null;
      if (!this.recovering.get(r)) {
        this.recovering.set(r);
        return r;
      }
    }
    return null;
  }

  setRegionSync(r: number, inSync: boolean): void {
    this.recovering.clear(r);
    const was = this.sync.get(r);
    if (inSync && !was) {
      this.sync.set(r);
      this.#syncCount++;
    } else if (!inSync && was) {
      this.sync.clear(r);
      this.#syncCount--;
    }
  }

  get syncCount(): number {
    return this.#syncCount;
  }

  /** at resume: in sync = clean (what a persistent log recorded), nothing recovering, search from 0 */
  loadSyncFromClean(): void {
    this.sync.copyFrom(this.clean);
    this.#syncCount = this.sync.count();
    this.recovering.fill(false);
    this.#search = 0;
  }

  /** at resume of a log that keeps its in-sync bits: nothing recovering, search from 0 */
  restartSearch(): void {
    this.recovering.fill(false);
    this.#search = 0;
  }
}

/** Read `<region_size>`: a power of 2, ≥ 8 sectors, ≤ the target length. */
export function readRegionSize(r: ArgReader, targetLength: number): number {
  const size = r.uint('region size');
  if (size < 8 || !Number.isInteger(Math.log2(size))) {
    r.fail(`invalid region size ${size} (must be a power of 2, ≥ 8 sectors)`);
  }
  if (size > targetLength) r.fail(`invalid region size ${size} (must not exceed the target length of ${targetLength} sectors)`);
  return size;
}

/** Read the optional `sync|nosync`; absent = `default`. */
export function readSyncMode(r: ArgReader): SyncMode {
  if (r.atEnd()) return 'default';
  const v = r.next('sync argument');
  if (v !== 'sync' && v !== 'nosync') r.fail(`invalid sync argument '${v}' (expected sync or nosync)`);
  return v;
}

/** `[ sync|nosync]` as the log's table status prints it */
export function syncSuffix(mode: SyncMode): string {
  return mode === 'default' ? '' : ` ${mode}`;
}

/** a log's argument count: `min` (… `<region_size>`) or `min + 1` (… `[sync|nosync]`) */
export function checkArgCount(r: ArgReader, type: string, count: number, min: number, usage: string): void {
  if (count < min || count > min + 1) {
    r.fail(`invalid ${type} log argument count ${count} (expected ${min} or ${min + 1}: ${usage})`);
  }
}

/**
 * `core` dirty log: all state in memory, nothing survives the process. A core-log mirror
 * therefore resyncs fully on every activation unless the table says `nosync`.
 *
 *   core <1|2> <region_size> [sync|nosync]
 */
import { ArgReader } from '../core/args.ts';
import type { StatusType } from '../core/types.ts';
import { RegionState, checkArgCount, readRegionSize, readSyncMode, syncSuffix } from './region-state.ts';
import type { DirtyLog, DirtyLogType, SyncMode } from './types.ts';

const RESOLVED = Promise.resolve();

class CoreLog implements DirtyLog {
  readonly type = 'core';
  readonly regionSize: number;
  readonly regionCount: number;
  readonly #mode: SyncMode;
  readonly #state: RegionState;

  constructor(regionSize: number, regionCount: number, mode: SyncMode) {
    this.regionSize = regionSize;
    this.regionCount = regionCount;
    this.#mode = mode;
    this.#state = new RegionState(regionCount, mode);
  }

  resume(): Promise<void> {
    this.#state.restartSearch();
    return RESOLVED;
  }
  presuspend(): Promise<void> {
    return RESOLVED;
  }
  postsuspend(): Promise<void> {
    return RESOLVED;
  }
  destroy(): Promise<void> {
    return RESOLVED;
  }

  isClean(region: number): boolean {
    return this.#state.isClean(region);
  }
  inSync(region: number): boolean {
    return this.#state.inSync(region);
  }
  markRegion(region: number): void {
    this.#state.mark(region);
  }
  clearRegion(region: number): void {
    this.#state.clear(region);
  }
  flush(): Promise<void> {
    this.#state.touchedDirtied = false;
    this.#state.touchedCleaned = false;
    return RESOLVED;
  }
  getResyncWork(): number | null {
    return this.#state.getResyncWork();
  }
  setRegionSync(region: number, inSync: boolean): void {
    this.#state.setRegionSync(region, inSync);
  }
  getSyncCount(): number {
    return this.#state.syncCount;
  }

  status(type: StatusType): string {
    if (type === 'info') return '1 core';
    return `core ${this.#mode === 'default' ? 1 : 2} ${this.regionSize}${syncSuffix(this.#mode)}`;
  }
}

export const coreLog: DirtyLogType = {
  name: 'core',
  /** `<region_size> [sync|nosync]` */
  create(_ctx, args, targetLength) {
    const r = new ArgReader(args, 'core');
    checkArgCount(r, 'core', args.length, 1, '<region_size> [sync|nosync]');
    const regionSize = readRegionSize(r, targetLength);
    const mode = readSyncMode(r);
    r.expectEnd();
    return new CoreLog(regionSize, Math.ceil(targetLength / regionSize), mode);
  },
};

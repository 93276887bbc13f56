/**
 * `core` dirty log: all state in memory, nothing survives the process. A core-log mirror
 * therefore resyncs fully on every activation unless the table says `nosync`.
 *
 *   core <1|2> <region_size> [sync|nosync]
 */
import { ArgReader } from '../core/args.ts';
import type { StatusType } from '../core/types.ts';
import { RegionStateLog } from './region-log.ts';
import { RegionState, checkArgCount, readRegionSize, readSyncMode, syncSuffix } from './region-state.ts';
import type { DirtyLog, DirtyLogType, SyncMode } from './types.ts';

const RESOLVED = Promise.resolve();

class CoreLog extends RegionStateLog implements DirtyLog {
  readonly #mode: SyncMode;

  constructor(regionSize: number, regionCount: number, mode: SyncMode) {
    super('core', regionSize, regionCount, new RegionState(regionCount, mode));
    this.#mode = mode;
  }

  resume(): Promise<void> {
    this.state.restartSearch();
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

  flush(): Promise<void> {
    this.state.touchedDirtied = false;
    this.state.touchedCleaned = false;
    return RESOLVED;
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

/**
 * What the built-in logs share: their identity (type, region size and count) and the
 * `DirtyLog` members they answer straight from their in-memory `RegionState`. A subclass
 * adds the lifecycle hooks, `flush` and `status`, and declares `implements DirtyLog`.
 */
import type { RegionState } from './region-state.ts';

export abstract class RegionStateLog {
  readonly type: string;
  readonly regionSize: number;
  readonly regionCount: number;
  protected readonly state: RegionState;

  protected constructor(type: string, regionSize: number, regionCount: number, state: RegionState) {
    this.type = type;
    this.regionSize = regionSize;
    this.regionCount = regionCount;
    this.state = state;
  }

  isClean(region: number): boolean {
    return this.state.isClean(region);
  }
  inSync(region: number): boolean {
    return this.state.inSync(region);
  }
  markRegion(region: number): void {
    this.state.mark(region);
  }
  clearRegion(region: number): void {
    this.state.clear(region);
  }
  getResyncWork(): number | null {
    return this.state.getResyncWork();
  }
  setRegionSync(region: number, inSync: boolean): void {
    this.state.setRegionSync(region, inSync);
  }
  getSyncCount(): number {
    return this.state.syncCount;
  }
}

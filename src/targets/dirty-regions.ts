/**
 * The replicator's two edits of a remote's dirty log, region by region: out of sync (the
 * site lacks it: marked and not in sync) and in sync (clean). Every writer of a replicator
 * dirty log goes through these, so a region is never marked without losing its sync bit.
 */
import type { DirtyLog } from '../dirtylog/types.ts';

/** region `region` differs at the site; returns whether it was in sync before */
export function outOfSync(dlog: DirtyLog, region: number): boolean {
  const was = dlog.inSync(region);
  dlog.markRegion(region);
  dlog.setRegionSync(region, false);
  return was;
}

/** every region differs at the site (a full resync) */
export function allOutOfSync(dlog: DirtyLog): void {
  for (let i = 0; i < dlog.regionCount; i++) outOfSync(dlog, i);
}

/** every region in sync and clean (seeding, a promotion, a resync into us done) */
export function allInSync(dlog: DirtyLog): void {
  for (let i = 0; i < dlog.regionCount; i++) {
    dlog.setRegionSync(i, true);
    dlog.clearRegion(i);
  }
}

/**
 * A site's resync and verify (the replicator's use of the copy service):
 *
 *   resync: copy every out-of-sync region local → site, pass after pass, each region held
 *   against writes while it is copied (the device's RegionGate); when a pass leaves nothing
 *   out of sync, writers are held for a moment, every logged entry is marked, and if still
 *   nothing is out of sync the site ships in order from the head on. After CONVERGE_PASSES
 *   passes under a writer that keeps dirtying regions, writers are held for the last pass
 *   (REPLICATION.md guarantee 5: resync converges).
 *
 *   A checksum resync (`resync <slink#> checksum`) compares each out-of-sync region by
 *   4 KiB block digests (replicator-checksum.ts) with the region held, and copies only the
 *   blocks that differ.
 *
 *   verify: compare every in-sync region with the site by block digests, the region held
 *   against writes and compared only once everything logged before is on the site (no
 *   false positives from writes in flight); differing regions go out of sync for a
 *   following resync.
 */
import { outOfSync } from './dirty-regions.ts';
import { copyRanges, type CopyOutcome } from '../core/copy.ts';
import { differingRuns } from './replicator-checksum.ts';
import type { Site } from './replicator-site.ts';
import type { SiteHost } from './replicator-types.ts';

/** resync passes under a running writer before writers are held for the last pass */
export const CONVERGE_PASSES = 3;
/** how long writers are held waiting for every entry to be marked before they are let go again */
const MARK_WAIT_MS = 1000;

export interface ResyncHandle {
  readonly abort: AbortController;
  /** sectors to copy in all (grows when writes dirty more regions) */
  total: number;
  copied: number;
  /** compare regions by block digests and copy only the blocks that differ (read at each range) */
  checksum: boolean;
}

/** Run passes until the site is in sync (resolves), aborted (resolves), or an I/O error (rejects). */
export async function resyncPasses(site: Site, host: SiteHost, h: ResyncHandle): Promise<void> {
  /** devices of the group not bound yet → when they are (asked once per run) */
  const bound = new Map<number, Promise<void>>();
  for (let pass = 1; ; pass++) {
    const last = pass > CONVERGE_PASSES;
    const release = last ? await host.hold() : null;
    let waited = true;
    let unbound: number[] = [];
    try {
      // (a last pass whose entries are not all marked yet copies nothing: writers go, and the pause below runs)
      if (!release || (waited = await marked(site, host))) {
        h.total = h.copied + site.outOfSync() * site.regionSectors();
        await copyPass(site, host, h);
        if (h.abort.signal.aborted) return;
        const hold = release ?? (await host.hold());
        try {
          waited = await marked(site, host);
          // a device of the group not bound yet (after a restart): what it has out of sync is
          // not known here, so the site is not declared in sync; tried again after the pause
          if (waited && (unbound = host.unbound()).length > 0) waited = false;
          if (waited && site.outOfSync() === 0 && !h.abort.signal.aborted) {
            site.toShip();
            return;
          }
        } finally {
          if (!release) hold();
        }
      }
    } finally {
      release?.();
    }
    if (h.abort.signal.aborted) return;
    if (!waited) { // writers go meanwhile; a pass again once the devices waited for are bound, at the latest after the pause
      let timer: NodeJS.Timeout | undefined;
      const pause = new Promise<void>((r) => (timer = setTimeout(r, MARK_WAIT_MS)));
      const binds = unbound.map((d) => bound.get(d) ?? bound.set(d, host.whenBound(d)).get(d)!);
      await Promise.race([pause, ...(binds.length ? [Promise.all(binds)] : [])]).finally(() => clearTimeout(timer));
    }
  }
}

/**
 * Writers held: wait until every logged entry is marked. False after MARK_WAIT_MS (an
 * entry of a device not bound yet, e.g. still being restored): the caller lets writers go
 * and tries again after a pause, rather than holding them for a device that may not come.
 */
async function marked(site: Site, host: SiteHost): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((r) => (timer = setTimeout(() => r(false), MARK_WAIT_MS)));
  return Promise.race([site.waitPosition(host.head).then(() => true), timeout]).finally(() => clearTimeout(timer));
}

/** copy every out-of-sync region of every device local → site once, then persist the dirty logs */
async function copyPass(site: Site, host: SiteHost, h: ResyncHandle): Promise<void> {
  const flow = host.resyncControl.flow(site.slink); // resync-control.ts: how much goes at once, and how fast
  for (const b of host.bindings()) {
    const r = b.remotes.get(site.slink);
    if (!r) continue;
    const dlog = r.dlog;
    /** checksum: sectors sent of each range (by its sector) */
    const sent = new Map<number, number>();
    const size = dlog.regionSize;
    let next = 0;
    await copyRanges({
      src: b.local,
      dst: [r.dev],
      ranges: () => {
        while (next < dlog.regionCount && dlog.inSync(next)) next++;
        if (next >= dlog.regionCount) return null;
        const sector = next++ * size;
        return { sector, sectors: Math.min(size, b.length - sector) };
      },
      chunkSectors: Math.min(size, 2048),
      concurrency: flow.maxRanges,
      rate: () => flow.rate(),
      before: (range) => flow.acquire(range.sector, range.sectors * 512, h.abort.signal),
      select: h.checksum ? async (range) => {
        const runs = await differingRuns(b.local, r.dev, range.sector, range.sectors);
        site.stats.comparedBytes += range.sectors * 512;
        sent.set(range.sector, runs.reduce((n, x) => n + x.sectors, 0));
        return runs;
      } : undefined,
      gate: b.gate ?? undefined,
      continueOnError: true,
      flushAtEnd: true,
      signal: h.abort.signal,
      after: (range, outcome: CopyOutcome) => {
        flow.release(range.sector, range.sectors * 512);
        const region = range.sector / size;
        if (outcome.readError || outcome.writeErrors[0]) throw outcome.readError ?? outcome.writeErrors[0]!;
        dlog.setRegionSync(region, true);
        dlog.clearRegion(region);
        h.copied += range.sectors;
        site.stats.resyncedBytes += (sent.get(range.sector) ?? range.sectors) * 512;
        sent.delete(range.sector);
      },
    });
    await dlog.flush();
  }
}

/** Compare the site with the local devices; marks and counts differing regions. `progress.done` counts regions. */
export async function verifySite(site: Site, host: SiteHost, progress: { done: number; total: number }): Promise<{ differing: number; regions: number }> {
  let differing = 0;
  let regions = 0;
  for (const b of host.bindings()) {
    const r = b.remotes.get(site.slink);
    if (!r || !b.gate) continue;
    const size = r.dlog.regionSize;
    for (let region = 0; region < r.dlog.regionCount; region++, progress.done++) {
      regions++;
      if (!r.dlog.inSync(region)) continue;
      const sector = region * size;
      const n = Math.min(size, b.length - sector);
      await b.gate.lock(region);
      try {
        await site.waitPosition(host.head);
        const runs = await differingRuns(b.local, r.dev, sector, n);
        site.stats.comparedBytes += n * 512;
        if (runs.length > 0) {
          differing++;
          outOfSync(r.dlog, region);
        }
      } finally {
        b.gate.unlock(region);
      }
    }
    await r.dlog.flush();
  }
  return { differing, regions };
}

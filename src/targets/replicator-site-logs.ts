/**
 * The dirty logs of one remote site (replicator-site.ts) over every bound device, and the
 * runs that work from them (replicator-resync.ts): in `log` mode the site's entries are
 * marked here instead of shipped, a resync copies what they say differs, and verify marks
 * what it finds differing. The site decides when a resync may start and what a resync's
 * I/O error does; this keeps the run, its progress and the last verify's result.
 */
import { allInSync, allOutOfSync, outOfSync } from './dirty-regions.ts';
import { BlockError } from '../core/errors.ts';
import type { ReplogEntry } from '../replog/types.ts';
import { resyncPasses, verifySite, type ResyncHandle } from './replicator-resync.ts';
import type { Site } from './replicator-site.ts';
import type { DevBinding, SiteHost } from './replicator-types.ts';

export class SiteLogs {
  readonly #host: SiteHost;
  readonly #site: Site;
  readonly #slink: number;
  /** a resync failed with an I/O error (not aborted) */
  readonly #failed: (err: unknown) => void;
  #resync: (ResyncHandle & { done: Promise<void> }) | null = null;
  /** a resync was asked for while the running one was stopping: start one when it ends */
  #restartAfter = false;
  #verify: { done: number; total: number } | null = null;
  #lastVerify: { differing: number; regions: number } | null = null;
  /** `resync … checksum`: resyncs compare by digests until one leaves the site in sync */
  #checksum = false;
  /** sectors of regions that went out of sync while the resync ran: work added to its total, so its done never goes back */
  #added = 0;

  constructor(host: SiteHost, site: Site, failed: (err: unknown) => void) {
    this.#host = host;
    this.#site = site;
    this.#slink = site.slink;
    this.#failed = failed;
  }

  // ---- the dirty logs ----

  /** log mode: the entry's regions are out of sync at this site */
  mark(e: ReplogEntry, b: DevBinding): void {
    const r = b.remotes.get(this.#slink);
    if (!r || e.op === 'flush' || e.sectors === 0) return;
    const size = r.dlog.regionSize;
    const last = Math.floor((e.sector + e.sectors - 1) / size);
    for (let region = Math.floor(e.sector / size); region <= last; region++) {
      if (outOfSync(r.dlog, region) && this.#resync) this.#added += size;
    }
  }

  /** every region of every bound device out of sync (a full resync) */
  markAll(): void {
    for (const b of this.#host.bindings()) {
      const r = b.remotes.get(this.#slink);
      if (!r) continue;
      allOutOfSync(r.dlog);
    }
  }

  /** `clear-bitmap <slink#>` (Site.clearBitmap): every region in sync and clean; in log mode the site ships from the head on */
  async clearBitmap(declared = true): Promise<void> {
    const site = this.#site;
    await this.stopResync();
    const release = await this.#host.hold();
    try {
      // log mode: every entry so far marked first (then dropped for good); ship mode keeps its backlog
      if (site.mode === 'log') await site.waitPosition(this.#host.head);
      for (const b of this.#host.bindings()) {
        const r = b.remotes.get(this.#slink);
        if (!r) continue;
        allInSync(r.dlog);
        await r.dlog.flush();
      }
      if (site.mode === 'log') site.toShip(declared);
      else site.event(`slink ${this.#slink}: bitmap cleared`);
    } finally {
      release();
    }
  }

  /** does any bound device have regions out of sync at this site? */
  anyOutOfSync(): boolean {
    for (const b of this.#host.bindings()) {
      const r = b.remotes.get(this.#slink);
      if (r && r.dlog.getSyncCount() < r.dlog.regionCount) return true;
    }
    return false;
  }

  /** regions out of sync at this site, over every bound device */
  outOfSync(): number {
    let n = 0;
    for (const b of this.#host.bindings()) {
      const r = b.remotes.get(this.#slink);
      if (r) n += r.dlog.regionCount - r.dlog.getSyncCount();
    }
    return n;
  }

  /** sectors per region of this site's dirty logs (0 when no device is bound) */
  regionSectors(): number {
    for (const b of this.#host.bindings()) {
      const r = b.remotes.get(this.#slink);
      if (r) return r.dlog.regionSize;
    }
    return 0;
  }

  // ---- resync and verify ----

  get resyncing(): boolean {
    return this.#resync !== null;
  }

  /**
   * Start a resync unless one runs (the site checked that it may run). One still stopping
   * (a suspend, a down, just before) is followed by a new one once it ends, the site
   * checking again then that it may run.
   */
  startResync(): void {
    if (this.#resync) {
      if (this.#resync.abort.signal.aborted) this.#restartAfter = true;
      return;
    }
    const abort = new AbortController();
    const handle = { abort, total: 0, copied: 0, checksum: this.#checksum, done: Promise.resolve() };
    this.#added = 0;
    const regions = this.outOfSync();
    this.#site.event(`slink ${this.#slink} resync started: ${regions} region(s) out of sync`, { work: 'resync', phase: 'start', regions });
    const ended = (phase: string): void => this.#site.event(`slink ${this.#slink} resync ${phase}: ${handle.copied} sectors copied`, { work: 'resync', phase, copiedSectors: handle.copied });
    handle.done = resyncPasses(this.#site, this.#host, handle).then(() => ended(abort.signal.aborted ? 'stopped' : 'done'), (err: unknown) => {
      ended(abort.signal.aborted ? 'stopped' : 'failed');
      throw err;
    }).catch((err: unknown) => {
      if ((err as { code?: string }).code !== 'EINTR' && !abort.signal.aborted) this.#failed(err);
    }).finally(() => {
      if (this.#resync === handle) this.#resync = null;
      if (this.outOfSync() === 0) this.#checksum = false;
      if (this.#restartAfter && this.#resync === null) {
        this.#restartAfter = false;
        this.#site.resyncIfDue();
      }
    });
    this.#resync = handle;
  }

  /** `resync <slink#> checksum`: this resync (from its next region on) and the next ones until the site is in sync compare by digests */
  useChecksum(): void {
    this.#checksum = true;
    if (this.#resync) this.#resync.checksum = true;
  }

  /** ask a running resync to stop, without waiting for it */
  abortResync(): void {
    this.#restartAfter = false;
    this.#resync?.abort.abort();
  }

  /** stop a running resync; resolves once its copies in flight are done */
  async stopResync(): Promise<void> {
    this.#restartAfter = false;
    const r = this.#resync;
    if (!r) return;
    r.abort.abort();
    await r.done;
  }

  get lastVerify(): { differing: number; regions: number } | null {
    return this.#lastVerify;
  }

  /** `verify <slink#>` (Site.verify): resolves with the number of regions that differ, now out of sync */
  async verify(): Promise<number> {
    const site = this.#site;
    if (!site.up || site.paused) throw new BlockError('EIO', `slink ${this.#slink} is ${site.paused ? 'suspended' : 'down'}: nothing to verify against`);
    let total = 0;
    for (const b of this.#host.bindings()) total += b.remotes.get(this.#slink)?.dlog.regionCount ?? 0;
    this.#verify = { done: 0, total };
    site.event(`slink ${this.#slink} verify started: ${total} region(s)`, { work: 'verify', phase: 'start', regions: total });
    try {
      this.#lastVerify = await verifySite(site, this.#host, this.#verify);
    } catch (err) {
      site.event(`slink ${this.#slink} verify failed: ${(err as Error).message}`, { work: 'verify', phase: 'failed' });
      throw err;
    } finally {
      this.#verify = null;
    }
    const { differing, regions } = this.#lastVerify;
    site.event(`slink ${this.#slink} verified: ${differing} region(s) differ`, { work: 'verify', phase: 'done', differing, regions });
    return this.#lastVerify.differing;
  }

  /**
   * verify progress, else resync progress in log mode, in sectors; null when neither runs.
   * A resync's total is every region plus those a write sent out of sync again while it
   * ran, so its `done` only grows (the share done may dip while writes add work).
   */
  progress(logMode: boolean): { work: string; done: number; total: number } | null {
    const size = this.regionSectors();
    if (this.#verify) return { work: 'verify', done: this.#verify.done * size, total: this.#verify.total * size };
    if (!logMode) return null;
    let total = 0;
    for (const b of this.#host.bindings()) {
      const r = b.remotes.get(this.#slink);
      if (r) total += r.dlog.regionCount * r.dlog.regionSize;
    }
    total += this.#added; // re-dirtied while the resync ran: more to do, none of it undone
    return { work: 'resync', done: total - this.outOfSync() * size, total };
  }
}

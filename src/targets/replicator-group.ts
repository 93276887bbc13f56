/**
 * A replication group (the `replicator` control target's instance): the replication log,
 * the sites, the devices bound by their replicator-devs, and the write path:
 *
 *   hold/stall check → region gate → log append (seq, epoch) → local write
 *   → every site that is synchronous at that moment has it → (fua: log flushed) → ack
 *
 * Epochs: a write that arrives after another write of the group completed may depend on
 * it, so it starts a new epoch; writes in flight together share one. Sites apply an epoch
 * only after the previous one completed there (REPLICATION.md guarantee 2).
 *
 * Checkpoints every CHECKPOINT_MS record where each site and the local devices stand; the
 * ring frees space behind the oldest of them. A full ring never fails a write: the site
 * holding the tail goes to its dirty logs (or, `+stall` and up, writers wait for it).
 */
import { allOutOfSync, outOfSync } from './dirty-regions.ts';
import { BOOT_ID, HAS_BOOT_ID } from '../core/boot-id.ts';
import { heldHere } from '../core/file-dev.ts';
import type { Bio } from '../core/bio.ts';
import { EMPTY } from '../core/bio.ts';
import { BlockError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { EventDetail, Progress, StatusType, Target, TargetContext } from '../core/types.ts';
import { CHECKPOINT_MAX_LEFT as MAX_LEFT, type CheckpointState, type Replog, type ReplogOp } from '../replog/types.ts';
import type { Needs } from '../replication/roles.ts';
import type { DirtyLog } from '../dirtylog/types.ts';
import type { SiteLink, SitePosition, SlinkRoles } from '../slink/types.ts';
import { epochOf, holdsLostEntries } from './replicator-lost.ts';
import type { GroupRole } from './replicator-role.ts';
import { groupMessage } from './replicator-messages.ts';
import { ResyncControl } from './resync-control.ts';
import type { Site } from './replicator-site.ts';
import { groupStatus, groupStatusJson } from './replicator-status.ts';
import { ActivityLog, EXTENT_SECTORS, LAST_EXTENT, extentsByDevice } from './replicator-activity.ts';
import type { DevBinding, SiteHost } from './replicator-types.ts';

const TICK_MS = 100;
const CHECKPOINT_TICKS = 2;
const TIMES = 1 << 16;
/** how long `demote` waits for sites that are up to take what they have */
const DEMOTE_WAIT_MS = 10_000;
const FLUSH_ENTRY: Bio = { op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} };
/** #append: the write no longer fits one entry (the ring was shrunk while it waited); write() splits it again */
const RESPLIT = new Error('resplit');

/** the boot id checkpoints carry (absent where the system has none) */
const BOOT: { boot?: string } = HAS_BOOT_ID ? { boot: BOOT_ID.toString('hex') } : {};

export interface GroupStats {
  enabled: boolean;
  writes: number;
  writeBytes: number;
  flushes: number;
  overflows: number;
}

export class ReplicatorGroup implements Target, SiteHost {
  readonly log: Replog;
  readonly logger: Logger;
  readonly local: SiteLink;
  readonly sites: readonly Site[];
  readonly ctx: TargetContext;
  readonly stats: GroupStats = { enabled: true, writes: 0, writeBytes: 0, flushes: 0, overflows: 0 };
  readonly resyncControl = new ResyncControl();
  appendedSectors = 0;

  #head = 0;
  #epoch = Date.now() * 1000;
  #epochDone = false;
  /** writes waiting their turn before the local write (write(): a synchronous network site) */
  #shipFirstWaiting = 0;
  readonly #times = new Float64Array(TIMES);
  readonly #bindings = new Map<number, DevBinding>();
  readonly #boundWaiters = new Map<number, Array<() => void>>();
  #recovered = false;
  #state: 'new' | 'active' | 'suspended' | 'destroyed' = 'new';
  /** entries appended whose local write is not done */
  readonly #localInflight = new Set<number>();
  /** local devices still to replay after recovery: localDone cannot pass recoveredLocalDone until done */
  readonly #replayPending = new Set<number>();
  /** a device left the group and its flush failed: no checkpoint of this run is quiesced */
  #unflushedLeft = false;
  #replayFrom = 0;
  #replayTo = 0;
  #holdP: Promise<void> | null = null;
  #holdRelease: (() => void) | null = null;
  #appending = 0;
  /** writers that came before the first resume */
  #activeWaiters: Array<() => void> = [];
  #appendWaiters: Array<() => void> = [];
  #overflowing: Promise<void> | null = null;
  /** the hold taken at suspend, released at resume */
  #suspendHold: (() => void) | null = null;
  #cp: Promise<void> = Promise.resolve();
  /** a checkpoint is queued or running */
  #cpRunning = false;
  #cpMark = '';
  /** why the last checkpoint that ran failed (null: it was written) */
  #cpError: Error | null = null;
  #timer: NodeJS.Timeout | null = null;
  #ticks = 0;

  /** primary or secondary, and the generation ids (replicator-role.ts) */
  readonly role: GroupRole;
  /** what a site's OPEN answered for a device not bound yet (slink:devNr) */
  readonly #opened = new Map<string, { resync: 'none' | 'partial' | 'full'; needs: Needs | null }>();
  /**
   * Slinks whose sites began entries the log lost (replicator-lost.ts): every device bound
   * there is verified whole, once per process (`#verified`: slink:devNr done). `#verifyPending`
   * is what checkpoints keep: a slink leaves it once every device bound there was verified
   * and the site is back in order; one that binds later in this process is still verified.
   */
  readonly #verifySlinks = new Set<number>();
  readonly #verifyPending = new Set<number>();
  readonly #verified = new Set<string>();
  /** the group's device numbers, bound or (after a restart) not yet: checkpoints keep them */
  readonly #knownDevs = new Set<number>();
  /**
   * Devices that left the group (removed, or forgotten) → the head when they left: the ring
   * may keep entries of theirs up to it, which no site ships and recovery does not replay,
   * whether that device number is bound again or not (checkpoints keep them, so a restart
   * does not wait for them); dropped once the ring's tail is past.
   */
  readonly #left = new Map<number, number>();
  /**
   * After a restart, devices with entries in the ring (not of a device that left) → the seq
   * of the last one, until they bind: a site behind that seq cannot ship, nor mark, past it
   * before they do (#unboundAhead)
   */
  readonly #unboundKept = new Map<number, number>();
  /** devices whose bind runs (replay, verification): not to be forgotten meanwhile */
  readonly #binding = new Set<number>();
  /** devices leaving the group (unbind: their backlog being recorded): their number is not bound again meanwhile */
  readonly #unbinding = new Set<number>();
  /** devices leaving (unbind): their sites may still ship their backlog in order, through them, until released */
  readonly #leaving = new Map<number, DevBinding>();
  /** per device, its entries being appended (seq taken, not yet written): unbind waits for them (#append) */
  readonly #appendsOf = new Map<number, number>();
  #appendIdle: Array<() => void> = [];
  /** #members dropped devices that left for want of room in the checkpoint (said once) */
  #leftDroppedSaid = false;
  /** devices forgotten (`forget`): their sites were not sent their writes, so they are verified whole if they bind again */
  readonly #forgotten = new Set<number>();
  /** the devices holding the full ring that #heldBy last said */
  #heldSaid = '';
  /** the state last handed to the log (or recovered): positions known durable */
  #cpState: CheckpointState = { localDone: 0, slinks: [] };
  /** the extents that may hold writes not yet durable here (replicator-activity.ts) */
  readonly activity: ActivityLog;
  /**
   * What a pending verification compares, by device: the extents the activity log held when
   * the log was cut off (they stay pinned meanwhile); null: every region
   */
  #verifyScope: Map<number, number[]> | null = null;
  /**
   * Checkpoints say the activity log is incomplete: writes went to a local device past it
   * (applied as secondary, until a full flush after promote: also while `role.secondary`)
   */
  #activityIncomplete = false;
  /** devices of the group not flushed since recovery (not bound yet): the extents recovered stay pinned meanwhile */
  readonly #unflushedSinceRecovery = new Set<number>();

  /** `activityExtents`: the activity log's size (0: none kept; after a power loss every site is verified whole) */
  constructor(ctx: TargetContext, log: Replog, local: SiteLink, sites: Site[], role: GroupRole, activityExtents: number) {
    this.ctx = ctx;
    this.log = log;
    this.logger = ctx.log;
    this.local = local;
    this.sites = sites;
    this.role = role;
    this.activity = new ActivityLog({ persist: () => this.#persistActivity(), flushAll: () => this.#flushAll(), done: () => this.#localDone() }, activityExtents);
  }

  // ---- roles (failover; docs/howto/failover.md) ----

  /** what a transport that carries generation ids (tcp) reports to the group */
  readonly roles: SlinkRoles = {
    secondary: () => this.role.secondary,
    gens: (slink) => this.role.gens(slink),
    opened: (slink, devNr, resync, needs) => {
      if (this.role.splitBrain !== null) {
        this.role.noteSplitBrain(null);
        this.event(`slink ${slink}: split brain resolved (the site took our data)`);
      }
      this.#opened.set(`${slink}:${devNr}`, { resync, needs });
      this.#applyOpened(slink, devNr);
    },
    refused: (slink, verdict, why) => {
      this.siteOf(slink)?.refused(new BlockError('EPERM', why));
      if (verdict === 'split-brain') {
        this.role.noteSplitBrain(`slink ${slink}: ${why}`);
        this.event(`slink ${slink} split-brain: ${why}`);
      }
    },
  };

  /**
   * SlinkContext.judge: a site (tcp) gave its applied position at connect. If it holds
   * entries this log lost (replicator-lost.ts), every region of the slink's devices goes out
   * of sync (durably: the dirty logs are flushed first, or a crash after the site's position
   * was set back would forget it), the site is resynced by checksum, and the site is told to
   * go back to what the slink has made good: every later entry is shipped to it again.
   */
  async judgeApplied(slink: number, pos: SitePosition): Promise<{ seq: number; epoch: number } | null> {
    const site = this.siteOf(slink);
    if (!site || this.#state === 'destroyed') return null;
    // not recovered yet: the connection fails and is made again (never skipped unjudged)
    if (!this.#recovered) throw new BlockError('EAGAIN', `${this.ctx.device}: the replication log is not recovered yet`);
    const head = Math.max(this.#head, this.log.head);
    if (!(await holdsLostEntries(this.log, head, pos))) return null;
    for (const b of this.#bindings.values()) this.#verified.delete(`${slink}:${b.devNr}`); // a new verdict: all of it again
    this.#verifySlinks.add(slink);
    this.#verifyPending.add(slink);
    let marked = 0;
    for (const b of this.#bindings.values()) if (await this.#verifyMark(slink, b)) marked++;
    // durable before the site goes back: a crash after that must not forget the verification
    await this.#persistFlags(this.#state === 'suspended');
    const seq = site.watermark;
    this.event(`slink ${slink}: the site applied entries this log no longer has (up to ${Math.max(pos.applied, pos.started)}, head ${head}: lost here, a power loss before the log was flushed?); its position goes back to ${seq} and ${this.#verifyWhat()} verified (checksum resync)`);
    if (marked > 0) site.requestResync(false, true);
    return { seq, epoch: await epochOf(this.log, seq) };
  }

  /**
   * The regions of device `b` a verification at `slink` compares out of sync, durably, once
   * per process: every region, or those of the extents in #verifyScope; whether it was done now
   */
  async #verifyMark(slink: number, b: DevBinding): Promise<boolean> {
    const r = b.remotes.get(slink);
    const key = `${slink}:${b.devNr}`;
    if (!r || this.#verified.has(key)) return false;
    if (this.#verifyScope === null) allOutOfSync(r.dlog);
    else markExtents(r.dlog, this.#verifyScope.get(b.devNr) ?? []);
    await r.dlog.flush();
    this.#verified.add(key);
    return true;
  }

  /** what a verification compares, for an event */
  #verifyWhat(): string {
    if (this.#verifyScope === null) return 'every region is';
    let n = 0;
    for (const list of this.#verifyScope.values()) n += list.length;
    return `the ${n} extent(s) of 4 MiB the activity log held are`;
  }

  /**
   * A checkpoint of the last positions (no site is flushed: one may be connecting) with this
   * boot's id, not quiesced, the epoch counter and the slinks to verify: what must be on
   * disk before a site is told to go back, and before the group takes writes in this boot.
   */
  /** `quiesced`: the group is suspended and stays so (a judgement while suspended); resume writes false */
  async #persistFlags(quiesced = false): Promise<void> {
    // not queued behind a running checkpoint (it may wait on a site that is connecting):
    // the state is taken and handed to the log in one step, as #checkpoint does, so the log
    // (which writes checkpoints in call order) never gets older positions after newer ones
    const [activity, version] = this.#activityPart();
    const state = { ...this.#cpState, epoch: this.#epoch, verify: [...this.#verifyPending], ...BOOT, quiesced, ...this.#members(), ...activity };
    this.#cpState = state;
    await this.log.checkpoint(state);
    this.activity.persisted(version);
  }

  /**
   * The sites verified: a later verdict compares everything. And every device of the group
   * flushed since recovery too: the extents recovered may go
   */
  #releaseRestored(): void {
    if (this.#verifyPending.size > 0) return;
    this.#verifyScope = null;
    if (this.#unflushedSinceRecovery.size === 0 && this.activity.restoredPinned) this.activity.unpin();
  }

  /** the activity log for a checkpoint taken now (absent when none is kept), and its version */
  #activityPart(): [Pick<CheckpointState, 'activity'>, number] {
    if (this.activity.capacity === 0) return [{}, 0];
    // a pending verification of every region: recovery must not narrow it to the extents
    const s = this.activity.snapshot((this.#verifyPending.size > 0 && this.#verifyScope === null) || this.role.secondary || this.#activityIncomplete);
    return [{ activity: { extents: s.extents, incomplete: s.incomplete } }, s.version];
  }

  /**
   * ActivityHost.persist: writes wait for a checkpoint that holds their extents. While the
   * group is not active (suspended, or replaced by a reload) no slot is written: the write
   * goes on only after resume, whose own checkpoint holds the extents (the activity log asks
   * again if it did not)
   */
  async #persistActivity(): Promise<void> {
    if (this.#state !== 'active') {
      if (this.#state === 'destroyed') throw new BlockError('ENXIO', `${this.ctx.device}: replicator removed`);
      await new Promise<void>((r) => this.#activeWaiters.push(r));
      return;
    }
    // a group quiesced meanwhile (postsuspend) stays so
    await this.#persistFlags(this.#cpState.quiesced === true);
  }

  /** ActivityHost.flushAll: the local devices and the log flushed; every entry up to the seq returned is durable */
  async #flushAll(): Promise<number> {
    const done = this.#localDone();
    await this.#flushLocalAndLog().catch((err: Error) => {
      this.logger.limited('activity', `${this.ctx.device}: activity log: flush of the local devices and the log failed: ${err.message}`);
      throw err;
    });
    return done;
  }

  /** the group's devices, those that left with entries perhaps still kept, and those forgotten: for a checkpoint */
  #members(): Pick<CheckpointState, 'devices' | 'left' | 'forgotten'> {
    for (const [d, seq] of this.#left) if (seq < this.log.tail) this.#left.delete(d);
    let left = [...this.#left].map(([dev, seq]) => ({ dev, seq }));
    if (left.length > MAX_LEFT) {
      // the latest to leave are kept. An older one's entries are waited for after a restart
      // (`forget` ends it); its number bound again then is sent them, and so is verified
      // whole at every site after (as forgotten)
      left = left.sort((a, b) => b.seq - a.seq);
      for (const l of left.slice(MAX_LEFT)) this.#forgotten.add(l.dev);
      left = left.slice(0, MAX_LEFT);
      if (!this.#leftDroppedSaid) this.logger.warn(`${this.ctx.device}: more than ${MAX_LEFT} devices left the group while the log keeps entries of theirs: a checkpoint keeps the latest ${MAX_LEFT}`);
      this.#leftDroppedSaid = true;
    }
    return { devices: [...this.#knownDevs], left, forgotten: [...this.#forgotten] };
  }

  /**
   * Slinks still to be verified, for a checkpoint: one leaves once every device of the
   * group was verified there in this process (one not bound since the restart keeps it:
   * it is verified when it binds) and the site is in order again.
   */
  #stillToVerify(): number[] {
    for (const slink of this.#verifyPending) {
      const site = this.siteOf(slink);
      const done = this.#knownDevs.size > 0 && [...this.#knownDevs].every((d) => {
        const b = this.#bindings.get(d);
        return this.#verified.has(`${slink}:${d}`) || (b !== undefined && !b.remotes.has(slink));
      });
      if (!site || (done && site.mode === 'ship' && site.outOfSync() === 0)) this.#verifyPending.delete(slink);
    }
    this.#releaseRestored();
    return [...this.#verifyPending];
  }

  /** a site took device `devNr` (OPEN): resync what it asks for, or note that it holds our generation */
  #applyOpened(slink: number, devNr: number): void {
    const key = `${slink}:${devNr}`;
    const o = this.#opened.get(key);
    const b = this.#bindings.get(devNr);
    const site = this.siteOf(slink);
    const r = b?.remotes.get(slink);
    if (!o || !b || !site || !r || this.role.secondary) return;
    this.#opened.delete(key);
    let marked = 0;
    if (o.resync === 'full') {
      allOutOfSync(r.dlog);
      marked = r.dlog.regionCount;
    }
    if (o.needs) marked += markNeeds(r.dlog, o.needs);
    // a partial verdict alone needs nothing: what the site lacks since it held our generation
    // is in the ring or the dirty logs already; only its own changes (needs) or a full verdict do
    if (o.resync === 'full' || marked > 0) {
      this.event(`slink ${slink}: ${b.name}: the site asks for ${o.resync === 'full' ? 'a full' : 'a partial'} resync (${marked} region(s) it changed or lacks)`);
      // a full verdict compares every block (checksum): the site holds most of it already
      site.requestResync(false, o.resync === 'full');
    } else {
      site.announce();
    }
  }

  /**
   * `dmkit demote`: the group becomes secondary. Sites that are up and shipping get a moment
   * to take what they have; what any site has not taken goes to its dirty logs (a new
   * primary overwrites those regions here), and the sites stop: a secondary ships nothing.
   */
  async demote(discard: boolean): Promise<void> {
    if (this.role.secondary) {
      if (discard && !this.role.discard) this.role.demote(true);
      return;
    }
    this.refuseUnbound('demote');
    const head = this.#head;
    const shipping = this.sites.filter((s) => s.up && !s.paused && s.mode === 'ship');
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      Promise.all(shipping.map((s) => s.waitPosition(head).catch(() => undefined))),
      new Promise<void>((r) => (timer = setTimeout(r, DEMOTE_WAIT_MS))),
    ]).finally(() => clearTimeout(timer));
    const release = await this.hold();
    try {
      this.role.beginDemote(); // sites stop; a primary that connects meanwhile is asked to come back
      for (const s of this.sites) await s.passivate();
      this.role.demote(discard); // only now is what a new primary must overwrite all in the dirty logs
      // a site promoted next knows whether that is a planned move (every site holds all we wrote)
      // (a site still to be verified whole, with a device not bound yet, is not known in sync)
      const allInSync = this.#stillToVerify().length === 0 && this.sites.every((s) => s.outOfSync() === 0);
      for (const s of this.sites) s.announceDemoted(allInSync);
    } finally {
      release();
    }
    await this.checkpointNow(); // what this side wrote is durable here before another side takes over
    this.event(`demoted: secondary${discard ? ' (its changes will be discarded)' : ''}, generation ${this.role.current}`);
  }

  /**
   * `dmkit promote`: the group becomes primary with a new generation; its sites ship from now
   * on. `planned`: the old primary demoted with every site in sync (its STATE said so);
   * otherwise a site that only received the old generation is resynced whole (checksum) when
   * it connects, since it may hold more or less of the old primary's stream than we do.
   */
  async promote(force: boolean, planned = false): Promise<void> {
    if (!this.role.secondary) throw new BlockError('EBUSY', `${this.ctx.device}: already primary`);
    if (!this.role.consistent && !force) {
      throw new BlockError('EPERM', `${this.ctx.device}: not consistent (a resync into it did not finish): promoting it would serve a mix of old and new data; use --force to promote anyway`);
    }
    // what the receiver applied went past the activity log: incomplete until it is flushed
    this.#activityIncomplete = true;
    this.role.promote(this.sites.map((s) => s.slink), planned);
    for (const s of this.sites) await s.activate();
    // what the receiver applied is durable here before this side's own writes and light checkpoints begin
    await this.checkpointNow();
    await this.#flushLocalAndLog().then(() => (this.#activityIncomplete = false), (err: Error) => {
      this.logger.warn(`${this.ctx.device}: flush after promote failed: ${err.message}; the activity log stays incomplete (a power loss verifies every region)`);
    });
    this.event(`promoted: primary, generation ${this.role.current}`);
  }

  /** a write as primary: no longer fresh; a new generation if a site holding the current one is away */
  #noteWrite(): void {
    const r = this.role;
    if (r.fresh) r.wrote();
    for (const s of this.sites) {
      if ((!s.up || s.paused) && r.peer(s.slink) === r.current) {
        r.rotate();
        this.event(`slink ${s.slink} is away: new generation ${r.current}`);
        return;
      }
    }
  }

  // ---- SiteHost ----

  get head(): number {
    return this.#head;
  }

  appendTime(seq: number): number {
    if (seq > this.#head || this.#head - seq >= TIMES) return this.#times[(this.#head + 1) % TIMES] || Date.now();
    return this.#times[seq % TIMES] || Date.now();
  }

  /** the device bound as `devNr`, or the one leaving as it (its backlog shipped meanwhile: unbind) */
  binding(devNr: number): DevBinding | null {
    return this.#bindings.get(devNr) ?? this.#leaving.get(devNr) ?? null;
  }

  bindings(): Iterable<DevBinding> {
    return this.#bindings.values();
  }

  *bindingsAndLeaving(): Iterable<DevBinding> {
    yield* this.#bindings.values();
    yield* this.#leaving.values();
  }

  unbound(): number[] {
    return [...this.#knownDevs].filter((d) => !this.#bindings.has(d)).sort((a, b) => a - b);
  }

  /**
   * `demote` and `clear-bitmap` speak for every device of the group, and wait (writers held)
   * for entries that only a bound device's dirty logs can take: refused while one is not
   * loaded since the restart, rather than holding the writers until it is
   */
  refuseUnbound(what: string): void {
    const n = this.unbound();
    if (n.length === 0) return;
    const devs = n.length === 1 ? `device ${n[0]} is` : `devices ${n.join(', ')} are`;
    throw new BlockError('EBUSY', `${this.ctx.device}: ${what}: ${devs} of the group but not loaded since the restart; load its replicator-dev, or 'forget <dev#>' it, first`);
  }

  whenBound(devNr: number): Promise<void> {
    if (this.#bindings.has(devNr)) return Promise.resolve();
    return new Promise((resolve) => {
      const list = this.#boundWaiters.get(devNr) ?? [];
      list.push(resolve);
      this.#boundWaiters.set(devNr, list);
    });
  }

  async hold(): Promise<() => void> {
    while (this.#holdP) await this.#holdP;
    let release!: () => void;
    this.#holdP = new Promise<void>((r) => (release = r));
    this.#holdRelease = release;
    while (this.#appending > 0) await new Promise<void>((r) => this.#appendWaiters.push(r));
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.#holdP = null;
      this.#holdRelease = null;
      release();
    };
  }

  event(what: string, detail?: EventDetail): void {
    this.logger.info(`${this.ctx.device}: ${what}`);
    this.ctx.event(what, detail);
    for (const b of this.#bindings.values()) b.event(what, detail);
  }

  /**
   * The largest write one log entry takes (replicator-dev splits at it): a quarter of the
   * ring (the ring refuses entries over half of it), a power of 2, at most 1 MiB.
   */
  get maxEntrySectors(): number {
    let n = 2048;
    while (n > 8 && n * 4 > this.log.size) n >>= 1;
    return n;
  }

  siteOf(slink: number): Site | undefined {
    return this.sites.find((s) => s.slink === slink);
  }

  // ---- devices ----

  /** a replicator-dev resumes: replay what recovery found for it, then ship for it */
  async bind(b: DevBinding): Promise<void> {
    // a device resumed before the group's first resume recovered the log waits for it (its replay and verification come from there)
    while (!this.#recovered) {
      if (this.#state === 'destroyed') throw new BlockError('ENXIO', `${this.ctx.device}: replicator removed`);
      await new Promise<void>((r) => this.#activeWaiters.push(r));
    }
    const other = this.#bindings.get(b.devNr);
    if (other && other.name !== b.name) {
      throw new BlockError('EBUSY', `${this.ctx.device}: device number ${b.devNr} is already bound by ${other.name}`);
    }
    if (this.#unbinding.has(b.devNr)) {
      throw new BlockError('EBUSY', `${this.ctx.device}: device number ${b.devNr} is still leaving the group (its backlog being recorded for the sites): try again once its remove is done`);
    }
    this.#binding.add(b.devNr);
    try {
      await this.#bindNow(b);
    } finally {
      this.#binding.delete(b.devNr);
    }
  }

  async #bindNow(b: DevBinding): Promise<void> {
    if (this.#replayPending.has(b.devNr)) {
      await this.#replay(b); // (flushes its local device)
      this.#replayPending.delete(b.devNr);
    } else if (this.#unflushedSinceRecovery.has(b.devNr)) {
      // what the last run wrote to it, durable before the extents recovered may go
      await b.local.submit(FLUSH_ENTRY);
    }
    this.#unflushedSinceRecovery.delete(b.devNr);
    this.#releaseRestored();
    // sites to verify whole: marked (and flushed) before the device's resyncs start, by checksum
    let verify = false;
    for (const slink of this.#verifySlinks) if (await this.#verifyMark(slink, b)) verify = true;
    // a device forgotten: no site was sent its writes since, so every site of it is verified whole
    const forgotten = this.#forgotten.has(b.devNr);
    if (forgotten) for (const r of b.remotes.values()) await allOutOfSyncDurably(r.dlog);
    this.#bindings.set(b.devNr, b);
    this.#knownDevs.add(b.devNr);
    this.#unboundKept.delete(b.devNr);
    this.#forgotten.delete(b.devNr);
    for (const w of this.#boundWaiters.get(b.devNr) ?? []) w();
    this.#boundWaiters.delete(b.devNr);
    if (verify) for (const slink of this.#verifySlinks) if (this.#verified.has(`${slink}:${b.devNr}`)) this.siteOf(slink)?.requestResync(false, true);
    if (forgotten) {
      this.event(`device ${b.devNr} (${b.name}) was forgotten: every site verifies it whole (checksum resync)`);
      for (const slink of b.remotes.keys()) this.siteOf(slink)?.requestResync(false, true);
      this.checkpointSoon();
    }
    for (const s of this.sites) s.bound(b);
    for (const s of this.sites) this.#applyOpened(s.slink, b.devNr);
  }

  /**
   * The replicator-dev's table is destroyed. If it is still the one bound (not replaced by
   * a reload), the device leaves the group: what the sites have not taken of it yet goes
   * to its dirty logs (Site.release) before they are closed.
   */
  async unbind(b: DevBinding): Promise<void> {
    // leaving from now on (before detach awaits the local flush): the number is neither bound
    // again nor forgotten meanwhile
    this.#unbinding.add(b.devNr);
    try {
      if (!(await this.detach(b))) return; // replaced by a reload
      // once detached it appends nothing (#append); those it began are written by now, and the head is past them
      while (this.#appendsOf.has(b.devNr)) await new Promise<void>((r) => this.#appendIdle.push(r));
      const head = this.#head;
      let released = true;
      this.#leaving.set(b.devNr, b);
      for (const s of this.sites) s.wake(); // a shipper waiting for the device goes on with it
      try {
        for (const s of this.sites) {
          await s.release(b).catch((err: Error) => {
            released = false;
            this.logger.warn(`${b.name}: slink ${s.slink}: backlog not recorded in the dirty log: ${err.message}; if device ${b.devNr} is loaded again, every site verifies it whole`);
          });
        }
      } finally {
        this.#leaving.delete(b.devNr);
      }
      // it leaves the group once every site has its backlog (in order, or in its dirty logs):
      // every site skips its entries from now on (also one it had no remote at, and whatever
      // device takes the number later), and from the next checkpoint on so does a restart. A
      // site that could not record them has lost them: as after `forget`, a device loaded
      // with that number later is verified whole at every site.
      this.#leave(b.devNr, head, !released);
    } finally {
      this.#unbinding.delete(b.devNr);
    }
    // recorded now (no tick runs while the group is suspended: its last checkpoint is
    // rewritten with the new members, quiesced as it was unless the leaving flush failed)
    if (this.#state === 'active') this.checkpointSoon();
    else if (this.#recovered && this.#state !== 'destroyed') await this.#persistFlags(this.#cpState.quiesced === true && !this.#unflushedLeft).catch(() => undefined);
  }

  /**
   * The engine stops: the device goes without leaving the group (the sites keep waiting for
   * it). False when `b` is not the binding (replaced by a reload). Checkpoints may not have
   * flushed its local device (#checkpoint), so it is flushed now, and a later clean stop's
   * checkpoint then vouches for it. (One not held here was flushed by every checkpoint while
   * it was bound, as before; flushing it here could wait for a suspended device under it.)
   */
  async detach(b: DevBinding): Promise<boolean> {
    if (this.#bindings.get(b.devNr) !== b) return false;
    // later full flushes no longer flush its local device (nor writes still in flight to it):
    // its extents stay named by the checkpoints until a restart
    this.activity.keepDevice(b.devNr);
    this.#bindings.delete(b.devNr);
    if (!heldHere(b.local)) return true;
    await b.local.submit(FLUSH_ENTRY).catch((err: Error) => {
      // its writes may not be on the disk: no later checkpoint of this run says the log was left cleanly
      this.#unflushedLeft = true;
      this.logger.warn(`${b.name}: flush of the local device as it leaves the group failed: ${err.message}`);
    });
    return true;
  }

  /** name of the device bound as `devNr`, if any */
  boundName(devNr: number): string | null {
    return this.#bindings.get(devNr)?.name ?? null;
  }

  /** Re-apply, in order, every logged write of `b` that may not have reached its local device before a crash. */
  async #replay(b: DevBinding): Promise<void> {
    const reader = this.log.reader(this.#replayFrom);
    let n = 0;
    for (let e = await reader.next(); e && e.seq <= this.#replayTo; e = await reader.next()) {
      if (e.devNr !== b.devNr || e.seq <= (this.#left.get(e.devNr) ?? 0)) continue; // another device's, or of one that left
      const bio: Bio = e.op === 'flush' ? FLUSH_ENTRY : { op: e.op, sector: e.sector, sectors: e.sectors, data: e.data, flags: {} };
      await b.local.submit(bio);
      n++;
    }
    await b.local.submit(FLUSH_ENTRY);
    if (n) this.event(`${b.name}: replayed ${n} logged write(s) onto the local device after recovery`);
  }

  // ---- the write path (called by replicator-dev's map) ----

  async write(b: DevBinding, bio: Bio): Promise<void> {
    const max = this.maxEntrySectors;
    if (bio.sectors > max && bio.op !== 'flush') return this.#writeSplit(b, bio, max);
    // the hold is checked again after the wait: hold() may have begun between #admit's
    // return and this continuation, and must see this write counted or not started
    do await this.#admit(); while (this.#holdP);
    // its extents in the activity log, durably, before it is logged or written anywhere
    const act = this.activity.capacity > 0 && bio.op !== 'flush';
    let held = true;
    if (act) {
      const entered = this.activity.enter(b.devNr, bio.sector, bio.sectors);
      if (entered !== true) {
        held = await entered;
        try {
          do await this.#admit(); while (this.#holdP); // (a hold may have begun meanwhile)
        } catch (err) {
          this.activity.leave(b.devNr, bio.sector, bio.sectors, this.#head, held);
          throw err;
        }
      }
    }
    this.#noteWrite();
    const appStarted = this.resyncControl.appStart(); // after admit: writers held by a resync are not counted
    this.#appending++;
    const gate = b.gate;
    const region = gate && bio.op !== 'flush' ? gate.regionOf(bio.sector) : -1;
    let entered = false;
    let seq = 0;
    let resplit = false;
    try {
      if (region >= 0) {
        if (!gate!.tryEnter(region)) await gate!.enter(region);
        entered = true;
      }
      seq = await this.#append(b, bio); // (counted in #localInflight by #append)
    } catch (err) {
      if (entered) gate!.leave(region);
      this.resyncControl.appEnd(appStarted);
      if (act) this.activity.leave(b.devNr, bio.sector, bio.sectors, this.#head, held);
      if (err !== RESPLIT) throw err;
      resplit = true;
    } finally {
      if (--this.#appending === 0) this.#wakeAppenders();
    }
    // the ring was shrunk while this write waited: nothing of it is logged; in pieces that fit now
    if (resplit) return this.#writeSplit(b, bio, this.maxEntrySectors);
    let shipFirst = false;
    for (const s of this.sites) {
      s.appended();
      if (s.synchronous && s.overNetwork) shipFirst = true;
    }
    try {
      // a synchronous site across a network: its round trip is the longest part of this
      // write, so its shipper sends the entry first (in this turn's microtasks) and the local
      // write runs while the entry is on the wire (R2: 4 KiB sync over tcp, p50 ~20 µs less).
      // While such a write waits, every later one waits too (setImmediate keeps their order):
      // local writes go out in log order, as the site applies them
      if (shipFirst || this.#shipFirstWaiting > 0) {
        this.#shipFirstWaiting++;
        try {
          await new Promise<void>((r) => setImmediate(r));
        } finally {
          this.#shipFirstWaiting--;
        }
      }
      await b.local.submit(bio).catch((err: unknown) => this.#localFailed(b, bio, err));
      this.#localInflight.delete(seq);
      const waits: Promise<void>[] = [];
      for (const s of this.sites) if (s.synchronous) waits.push(s.waitShipped(seq));
      if (bio.op === 'flush' || bio.flags.fua) waits.push(this.log.flush());
      if (waits.length) await Promise.all(waits);
    } finally {
      this.#localInflight.delete(seq);
      if (act) this.activity.leave(b.devNr, bio.sector, bio.sectors, seq, held);
      if (entered) gate!.leave(region);
      this.#epochDone = true;
      this.resyncControl.appEnd(appStarted);
    }
    if (this.stats.enabled) {
      if (bio.op === 'flush') this.stats.flushes++;
      else {
        this.stats.writes++;
        this.stats.writeBytes += bio.data.length;
      }
    }
  }

  /**
   * The local write of a logged entry failed: the write fails, but its entry is in the log
   * and the sites get it, so their copy of the range would hold data the local device may
   * lack, for good. The range as the local device has it is read back and logged as a
   * correcting entry in a later epoch (the write's region is still held, so nothing else
   * writes it meanwhile): every site applies the failed write, then the correction, in order,
   * as a replay after a crash does. If that cannot be logged (the group is being held), the
   * range goes out of sync at every site (dirty logs flushed first) and the sites are
   * resynced from the local device. If the local device cannot be read back either, the
   * sites keep the failed write's data: the only copy of that range left. Rethrows the error.
   */
  async #localFailed(b: DevBinding, bio: Bio, err: unknown): Promise<never> {
    if (bio.op === 'flush') throw err;
    const why = `${b.name}: local write failed at sector ${bio.sector} (${bio.sectors} sectors): ${(err as Error).message}`;
    const data = Buffer.allocUnsafe(bio.sectors * 512);
    try {
      await b.local.submit({ op: 'read', sector: bio.sector, sectors: bio.sectors, data, flags: {} });
    } catch (readErr) {
      this.logger.limited('local-failed', `${why}; reading the range back failed too (${(readErr as Error).message}): the sites keep the failed write's data`);
      throw err;
    }
    if (!this.#holdP && this.#state === 'active') {
      this.#appending++;
      try {
        this.#epochDone = true; // the correction in an epoch after the failed write's
        const seq = await this.#append(b, { op: 'write', sector: bio.sector, sectors: bio.sectors, data, flags: {} });
        this.#localInflight.delete(seq); // (its data is what the local device holds)
        for (const s of this.sites) s.appended();
        this.logger.limited('local-failed', `${why}; the range as the local device has it is logged after it (entry ${seq}), so the sites end equal to it`);
        throw err;
      } catch (e) {
        if (e === err) throw err;
      } finally {
        if (--this.#appending === 0) this.#wakeAppenders();
      }
    }
    for (const [slink, r] of b.remotes) {
      const dlog = r.dlog;
      markRange(dlog, bio.sector, bio.sectors);
      await dlog.flush().catch((e: Error) => this.logger.warn(`${b.name}: slink ${slink}: the regions of a failed local write could not be recorded in the dirty log: ${e.message}`));
      this.siteOf(slink)?.requestResync(false);
    }
    this.logger.limited('local-failed', `${why}; its regions are resynced to every site from the local device`);
    throw err;
  }

  /** a write larger than a log entry takes now (the ring was shrunk since the device was loaded), in pieces */
  async #writeSplit(b: DevBinding, bio: Bio, max: number): Promise<void> {
    const parts: Promise<void>[] = [];
    for (let s = 0; s < bio.sectors; s += max) {
      const n = Math.min(max, bio.sectors - s);
      const data = bio.op === 'write' ? bio.data.subarray(s * 512, (s + n) * 512) : EMPTY;
      parts.push(this.write(b, { op: bio.op, sector: bio.sector + s, sectors: n, data, flags: bio.flags }));
    }
    const results = await Promise.allSettled(parts);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /** wait while writers are held (resync's last pass, clear-bitmap) or a +stall site is behind */
  async #admit(): Promise<void> {
    for (;;) {
      if (this.#state === 'destroyed') throw new BlockError('ENXIO', `${this.ctx.device}: replicator removed`);
      if (this.#state === 'new') { // not resumed yet (or its first resume failed): nothing may be logged before this boot's checkpoint
        await new Promise<void>((r) => this.#activeWaiters.push(r));
        continue;
      }
      if (this.#holdP) {
        await this.#holdP;
        continue;
      }
      const stalled = this.sites.find((s) => s.stalled);
      if (stalled) {
        await stalled.waitUnstalled();
        continue;
      }
      return;
    }
  }

  #wakeAppenders(): void {
    const w = this.#appendWaiters;
    this.#appendWaiters = [];
    for (const f of w) f();
  }

  async #append(b: DevBinding, bio: Bio): Promise<number> {
    const op = bio.op as ReplogOp;
    const devNr = b.devNr;
    for (;;) {
      while (this.#overflowing) await this.#overflowing;
      // a device removed while this write waited (admission, ring space) logs nothing more:
      // its entries end where unbind took them to end (#appendsOf)
      if (this.#bindings.get(devNr) !== b) throw new BlockError('ENXIO', `${b.name}: no longer in the group of ${this.ctx.device} (removed)`);
      if (op === 'write' && bio.sectors > this.maxEntrySectors) throw RESPLIT; // (shrunk since write() split it)
      if (op === 'flush' || this.#epochDone) {
        this.#epoch++;
        this.#epochDone = false;
      }
      this.#appendsOf.set(devNr, (this.#appendsOf.get(devNr) ?? 0) + 1);
      try {
        const appended = this.log.append({
          devNr, op, sector: bio.sector, sectors: bio.sectors,
          data: op === 'write' ? bio.data : EMPTY, epoch: this.#epoch, fua: !!bio.flags.fua,
        });
        // a flush ends its epoch: a write appended while the flush's append is written takes the next
        if (op === 'flush') this.#epochDone = true;
        const seq = await appended;
        // in flight locally before the head moves: a checkpoint's localDone (and a full flush
        // that lets activity-log extents go) never counts a write whose local write is not done
        this.#localInflight.add(seq);
        if (seq > this.#head) this.#head = seq;
        this.#times[seq % TIMES] = Date.now();
        this.appendedSectors += bio.sectors;
        // a ring half full gets its checkpoint now, not at the next tick: space frees before writers hit ENOSPC
        if (!this.#cpRunning && this.log.used() * 2 > this.log.size) void this.#checkpoint();
        return seq;
      } catch (err) {
        // an append a resize deferred, then found too large for the smaller ring: split again (write())
        if (op === 'write' && bio.sectors > this.maxEntrySectors) throw RESPLIT;
        if ((err as { code?: string }).code !== 'ENOSPC') throw err;
        this.#overflowing ??= this.#makeSpace().finally(() => (this.#overflowing = null));
      } finally {
        const n = this.#appendsOf.get(devNr)! - 1;
        if (n > 0) this.#appendsOf.set(devNr, n);
        else {
          this.#appendsOf.delete(devNr);
          if (this.#appendIdle.length > 0) for (const w of this.#appendIdle.splice(0)) w();
        }
      }
    }
  }

  /**
   * The ring is full: checkpoint. If that leaves the ring over half full and freed less
   * than an eighth of it, it only freed the little a site much slower than the writers
   * shipped since the last one: waiting for it would hold the writers to that site's pace,
   * so the site holding the tail goes to its dirty logs (REPLICATION.md guarantee 4),
   * unless it is `+stall` and up (writers wait for it). A site that freed more is keeping
   * up near enough (a burst); writers go on.
   */
  async #makeSpace(): Promise<void> {
    const tail = this.log.tail;
    const used = this.log.used();
    await this.#checkpoint();
    this.#heldBy();
    const freed = this.log.tail !== tail;
    // a site that shipped an eighth of the ring since the last checkpoint is keeping up, near enough
    if (freed && (this.log.used() * 2 <= this.log.size || (used - this.log.used()) * 8 >= this.log.size)) return;
    const holder = this.sites.filter((s) => s.mode === 'ship').sort((a, b) => a.watermark - b.watermark)[0];
    if (!holder || holder.watermark >= this.#localDone()) {
      if (!freed) await sleep(2); // local writes in flight hold the tail
      return;
    }
    if (!this.#unboundAhead(holder).next().done) {
      if (!freed) await sleep(5); // it cannot go past an entry of a device not loaded (nor mark it): writers wait (#heldBy)
      return;
    }
    if (holder.policy.onFallBehind === 'stall' && holder.up && !holder.paused) {
      if (!freed) await sleep(5); // +stall: writers wait for the site
      return;
    }
    this.stats.overflows++;
    this.logger.warn(`${this.ctx.device}: replication log full: slink ${holder.slink} falls back to its dirty logs`);
    try {
      await holder.overflow();
    } catch {
      await sleep(10); // the replicator is suspended: writers wait for its resume
      return;
    }
    await this.#checkpoint();
  }

  /**
   * The ring is full: is its tail held by devices not loaded since a restart? Entries logged
   * before a crash are replayed onto their local device when it binds, and a site ships a
   * device's entries (or marks them in its dirty logs) only once it is bound: for those the
   * ring keeps them and writers wait. Said once per change of those devices (event) and in
   * the daemon's log (at most once a second), so that a stalled group says why and what
   * ends it (`forget`).
   */
  #heldBy(): void {
    const devs = new Set<number>();
    if (this.#replayPending.size > 0 && this.log.tail >= this.#replayFrom) for (const d of this.#replayPending) devs.add(d);
    for (const s of this.sites) for (const d of this.#unboundAhead(s)) devs.add(d);
    const list = [...devs].sort((a, b) => a - b).join(', ');
    if (list === '') {
      this.#heldSaid = '';
      return;
    }
    const n = devs.size === 1 ? `device ${list}` : `devices ${list}`;
    const msg = `${this.ctx.device}: the replication log is full: it keeps logged writes of ${n}, not loaded since the restart, until its replicator-dev is loaded (or \`forget <dev#>\` gives them up); writers wait`;
    this.logger.limited('replay-hold', msg);
    if (this.#heldSaid === list) return;
    this.#heldSaid = list;
    this.event(`replication log full: ${n} not loaded since the restart holds it (its logged writes wait for its replicator-dev; 'forget <dev#>' gives them up); writers wait`);
  }

  /** the devices not bound since the restart whose entries `site` has yet to ship or mark */
  *#unboundAhead(site: Site): Generator<number> {
    for (const [d, last] of this.#unboundKept) if (last > site.watermark && !this.#bindings.has(d)) yield d;
  }

  /**
   * `forget <dev#>`: a device of the group not loaded since the restart (its replicator-dev
   * will not come back) leaves the group without its logged writes: those not yet on its
   * local device are not replayed there, and no site is sent them (nor marks them: its dirty
   * logs are in the table that is not loaded). Recorded durably; if the device binds again,
   * every site of it is verified whole against its local device.
   */
  async forget(devNr: number): Promise<void> {
    const replay = this.#replayPending.delete(devNr);
    this.#unboundKept.delete(devNr);
    this.#leave(devNr, this.#head, true);
    // loaded again, it is verified whole: the extents recovered need not wait for it
    this.#unflushedSinceRecovery.delete(devNr);
    this.#releaseRestored();
    await this.checkpointNow();
    if (this.#cpError) {
      // in effect in this run; after a restart its entries are waited for again (forget again then)
      throw new BlockError('EIO', `${this.ctx.device}: device ${devNr} is forgotten until the daemon stops, not for good: the checkpoint recording it failed: ${this.#cpError.message}`);
    }
    this.event(`device ${devNr} forgotten: ${replay ? 'its logged writes not yet on its local device are dropped, and ' : ''}no site is sent its logged writes; if it is loaded again, every site verifies it whole (checksum resync)`);
  }

  /**
   * Device `devNr` leaves the group, its entries up to `head` with it: every site skips them
   * from now on, and checkpoints keep that (#left). `forgotten`: no site was sent them (nor
   * marked them), so a device bound with that number later is verified whole at every site.
   */
  #leave(devNr: number, head: number, forgotten: boolean): void {
    for (const s of this.sites) s.skip(devNr, head);
    this.#knownDevs.delete(devNr);
    this.#left.set(devNr, head);
    if (forgotten) this.#forgotten.add(devNr);
  }

  /** `forget`'s check: null when `devNr` may be forgotten, else why not */
  forgetRefusal(devNr: number): string | null {
    if (this.#binding.has(devNr)) return `device ${devNr} is being loaded (its logged writes replayed, its sites judged): try again once it is`;
    if (this.#unbinding.has(devNr)) return `device ${devNr} is being removed (its backlog recorded for the sites): it leaves the group by itself`;
    const b = this.#bindings.get(devNr);
    if (b) return `device ${devNr} is loaded (${b.name}): \`dmkit remove ${b.name}\` takes it out of the group`;
    if (!this.#knownDevs.has(devNr) && !this.#unboundKept.has(devNr)) {
      const known = [...this.#knownDevs].sort((x, y) => x - y).join(', ') || 'none';
      return `device ${devNr} is not in the group (its devices: ${known})`;
    }
    return null;
  }

  // ---- checkpoints ----

  #localDone(): number {
    let done = this.#head;
    for (const s of this.#localInflight) if (s - 1 < done) done = s - 1;
    if (this.#replayPending.size > 0 && this.#replayFrom - 1 < done) done = this.#replayFrom - 1;
    return done;
  }

  /**
   * `quiesced`: the group is suspended with nothing in flight (the checkpoint says the log
   * was left cleanly). `durable`: the local devices and the log's entries are flushed first,
   * as they always are for a quiesced checkpoint and where the system has no boot id.
   *
   * The others (the 200 ms tick, a full ring, a site's change of state) flush only each
   * site (its position: a site may lose power alone) and write the slot with FUA, when the
   * log and every local device are held here (heldHere: files and block devices of this
   * machine). Neither the local devices nor the log's entries need then be durable for the
   * ring to drop an entry: a process crash keeps them (the page cache), and a power loss or
   * machine crash is told by the boot id (the log was cut off), after which every site is
   * verified whole against the local devices. A write acknowledged without FUA or flush may
   * then be lost, everywhere alike, as a volatile cache allows. A `dm:` or `nbd://` local
   * device or log may lose writes without this machine losing power: for those every
   * checkpoint flushes everything first, as where the system has no boot id.
   */
  #checkpoint(quiesced?: boolean, durable = false): Promise<void> {
    this.#cpRunning = true;
    const run = this.#cp.then(async () => {
      const epoch = this.#epoch; // every entry appended so far has an epoch at most this
      const localDone = this.#localDone();
      // quiesced as the group is when the state is taken (postsuspend says so before it is suspended)
      const clean = (quiesced ?? this.#state === 'suspended') && !this.#unflushedLeft;
      // the flushes run together (measured at 1 MiB writes: one after the other they took
      // ~20 ms each, and writers waited for ring space), then the checkpoint is written
      const [slinks, flushed] = await Promise.all([
        Promise.all(this.sites.map((s) => s.position())),
        durable || clean || !this.#heldHere() ? this.#flushLocalAndLog().then(() => true) : false,
      ]);
      if (flushed) this.activity.flushed(localDone);
      const verify = this.#stillToVerify();
      const [activity, version] = this.#activityPart();
      const state = { localDone, slinks, epoch, verify, ...BOOT, quiesced: clean, ...this.#members(), ...activity };
      this.#cpState = state;
      await this.log.checkpoint(state);
      this.activity.persisted(version);
      // entries behind the new tail that no ship still reads: the log may reuse their memory
      let held = Infinity;
      for (const s of this.sites) held = Math.min(held, s.oldestHeld);
      this.log.reclaim?.(held);
      this.#cpMark = `${localDone}:${slinks.map((p) => `${p.seq}${p.mode}`).join(',')}`;
      this.#cpError = null;
    });
    const cp = run.catch((err: unknown) => {
      this.#cpError = err as Error;
      this.logger.limited('checkpoint', `${this.ctx.device}: checkpoint failed: ${(err as Error).message}`);
    })
      .finally(() => {
        if (this.#cp === cp) this.#cpRunning = false;
      });
    this.#cp = cp;
    return cp;
  }

  /** the local devices and the log's entries, flushed together */
  #flushLocalAndLog(): Promise<unknown> {
    return Promise.all([...[...this.#bindings.values()].map((b) => b.local.submit(FLUSH_ENTRY)), this.log.flush()]);
  }

  /** may a checkpoint leave the log and the local devices unflushed? (#checkpoint) */
  #heldHere(): boolean {
    if (!HAS_BOOT_ID || this.log.heldHere?.() !== true) return false;
    for (const b of this.#bindings.values()) if (!heldHere(b.local)) return false;
    return true;
  }

  #tick(): void {
    for (const s of this.sites) s.tick();
    if (++this.#ticks % CHECKPOINT_TICKS !== 0) return;
    const mark = `${this.#localDone()}:${this.sites.map((s) => `${s.watermark}${s.mode}`).join(',')}`;
    if (mark !== this.#cpMark) void this.#checkpoint();
  }

  // ---- Target ----

  /** the control device carries no data: reads are zeroes, writes fail */
  map(bio: Bio): Promise<void> {
    if (bio.op === 'read') {
      bio.data.fill(0);
      return Promise.resolve();
    }
    if (bio.op === 'flush') return Promise.resolve();
    return Promise.reject(new BlockError('EPERM', `${this.ctx.device}: the replicator control device carries no data`));
  }

  async resume(): Promise<void> {
    if (this.#state === 'active') return;
    if (!this.#recovered) await this.#recover();
    // this boot's checkpoint, not quiesced, before any write: a power loss from here on is told apart from a clean stop
    await this.#persistFlags();
    this.#state = 'active';
    for (const w of this.#activeWaiters.splice(0)) w();
    for (const s of this.sites) s.start();
    this.#suspendHold?.();
    this.#suspendHold = null;
    this.#timer = setInterval(() => this.#tick(), TICK_MS);
    this.#timer.unref?.();
  }

  async #recover(): Promise<void> {
    const rec = await this.log.recover();
    this.#head = rec.head;
    // no checkpoint yet (a crash before the first one): every entry in the ring is to be replayed and shipped
    const base = this.log.tail - 1;
    const localDone = Math.min(rec.state?.localDone ?? base, rec.head);
    const st = rec.state;
    const cutOff = !!st?.boot && HAS_BOOT_ID && st.boot !== BOOT.boot && !st.quiesced;
    // a slink the last checkpoint does not know (added to the table since) starts on its dirty logs
    const positions = this.sites.map((s) => (rec.state
      ? rec.state.slinks.find((p) => p.slink === s.slink) ?? { slink: s.slink, seq: localDone, mode: 'log' as const }
      : { slink: s.slink, seq: base, mode: 'ship' as const }));
    // one pass over what is kept: the devices to replay, and each site's backlog in sectors (its lag)
    const backlog = this.sites.map(() => 0);
    // (a power loss may have lost entries up to a device's leaving seq: later seqs are new entries, of whatever device)
    for (const l of rec.state?.left ?? []) this.#left.set(l.dev, Math.min(l.seq, rec.head));
    const from = Math.min(localDone, ...positions.map((p) => p.seq)) + 1;
    if (from <= rec.head) {
      const reader = this.log.reader(from);
      for (let e = await reader.next(); e && e.seq <= rec.head; e = await reader.next()) {
        if (e.seq > (this.#left.get(e.devNr) ?? 0)) { // not of a device that left
          if (e.seq > localDone) this.#replayPending.add(e.devNr);
          this.#unboundKept.set(e.devNr, e.seq);
        }
        positions.forEach((p, i) => {
          if (e!.seq > p.seq) backlog[i]! += e!.sectors;
        });
      }
    }
    this.sites.forEach((s, i) => s.init(positions[i]!, rec.head, backlog[i]!));
    this.#cpState = { localDone, slinks: positions.map((p) => ({ ...p, seq: Math.min(p.seq, rec.head) })) };
    // the group's devices: those the checkpoint names, and any with entries after localDone
    // (bound in the last run, perhaps since its last checkpoint); the entries of devices that
    // left are not waited for, by the sites nor by the replay (the scan above)
    for (const d of rec.state?.devices ?? []) this.#knownDevs.add(d);
    for (const d of this.#replayPending) this.#knownDevs.add(d);
    for (const d of rec.state?.forgotten ?? []) this.#forgotten.add(d);
    // the extents recovered stay until every device of the group was flushed in this run (a
    // full flush covers only the devices bound)
    for (const d of this.#knownDevs) this.#unflushedSinceRecovery.add(d);
    for (const [d, seq] of this.#left) for (const s of this.sites) s.skip(d, seq);
    const verify = new Set(rec.state?.verify ?? []);
    // the activity log recovered: the extents that may hold writes not durable here when the
    // checkpoint was written (null: none kept, or incomplete). They stay until a flush covers
    // what was written to them; while a verification is pending they are what it compares,
    // and stay until it is over
    // (a log without a checkpoint of the replicator's was never written to: nothing to keep)
    const act = !st ? [] : st.activity && !st.activity.incomplete ? st.activity.extents : null;
    this.activity.restore(act, rec.head);
    // in this boot the page cache kept every entry up to the checkpoint's positions: a log that
    // ends before them was damaged (not cut off), and the entries lost may be anywhere on the
    // local devices while sites behind never got them: every region of every site is verified
    const damaged = !cutOff && !!st && (st.localDone > rec.head || st.slinks.some((p) => p.seq > rec.head));
    if (act !== null && (cutOff || verify.size > 0) && !damaged) this.#verifyScope = extentsByDevice(act);
    if (cutOff) {
      // cut off by a power loss or a machine crash (docs/formats/replog.md): the log's
      // unflushed tail may be gone while sites got some of it, and the local devices may hold
      // writes whose entries are gone: every site is verified, in the extents of the activity
      // log (every write since the last full flush went to one of them), or whole
      for (const s of this.sites) verify.add(s.slink);
      this.event(`the replication log was not closed cleanly in an earlier boot (a power loss or a machine crash): writes since its last flush may be lost here or held by a site only; at every site ${this.#verifyWhat()} verified (checksum resync)`);
    }
    if (damaged) {
      for (const s of this.sites) verify.add(s.slink);
      this.event(`the replication log ends at entry ${rec.head}, before entries its last checkpoint counts as written (up to ${Math.max(st!.localDone, ...st!.slinks.map((p) => p.seq))}): damaged in this boot; at every site every region is verified (checksum resync)`);
    }
    for (const n of verify) {
      this.#verifySlinks.add(n);
      this.#verifyPending.add(n);
    }
    // epochs go on above any the lost tail of the log could have used, even if the clock went
    // back: no more entries than the ring's sectors can follow the checkpoint's counter
    // unrecorded, and each takes at most one new epoch (replicator-lost.ts)
    const floor = Math.max((rec.state?.epoch ?? 0) + this.log.size + 1, (await epochOf(this.log, rec.head)) + 1);
    if (floor > this.#epoch) this.#epoch = floor;
    if (localDone < rec.head) {
      this.#replayFrom = localDone + 1;
      this.#replayTo = rec.head;
    }
    if (rec.tornTail) this.event(`replication log: a torn entry at the head was discarded (${cutOff ? 'written after the log\'s last flush' : 'never acknowledged'})`);
    if (rec.entries > 0) this.logger.info(`${this.ctx.device}: recovered ${rec.entries} log entries, head ${rec.head}`);
    this.#recovered = true;
  }

  async presuspend(): Promise<void> {
    if (this.#state !== 'active') return;
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
  }

  /**
   * Suspended, the group logs nothing: writers of its replicator-devs wait (as dm queues
   * I/O of a suspended device) until resume, so nothing is appended behind a checkpoint or
   * after the ring has been handed to a new table (reload).
   */
  async postsuspend(): Promise<void> {
    if (this.#state !== 'active') return;
    await this.#checkpoint();
    for (const s of this.sites) await s.stop(); // ends resyncs (and any hold they have) first
    this.#suspendHold = await this.hold();
    await this.#checkpoint(true);
    this.#state = 'suspended';
  }

  async destroy(): Promise<void> {
    if (this.#state === 'active') {
      await this.presuspend();
      await this.postsuspend().catch(() => undefined);
    }
    this.#state = 'destroyed';
    for (const w of this.#activeWaiters.splice(0)) w(); // they fail: removed
    this.#suspendHold?.();
    this.#holdRelease?.();
    for (const s of this.sites) await s.stop().catch(() => undefined);
    for (const s of this.sites) await s.link.destroy();
    await this.local.destroy();
    await this.log.destroy();
  }

  message(args: string[]): Promise<string | void> | string | void {
    return groupMessage(this, args);
  }

  /** for `replog resize`, `demote` and messages that need a checkpoint first: everything made durable */
  checkpointNow(): Promise<void> {
    return this.#checkpoint(undefined, true);
  }

  checkpointSoon(): void {
    if (this.#state === 'active') void this.#checkpoint();
  }

  status(type: StatusType): string {
    return groupStatus(this, type);
  }

  statusJson(): unknown {
    return groupStatusJson(this);
  }

  progress(): Progress | null {
    let done = 0;
    let total = 0;
    let work = '';
    for (const s of this.sites) {
      const p = s.progress();
      if (!p) continue;
      work ||= p.work;
      done += p.done;
      total += p.total;
    }
    return total > 0 ? { work, doneSectors: done, totalSectors: total } : null;
  }
}

/** every region of `dlog` out of sync, flushed */
async function allOutOfSyncDurably(dlog: DirtyLog): Promise<void> {
  allOutOfSync(dlog);
  await dlog.flush();
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** mark the regions of `dlog` that overlap sectors [sector, sector + sectors); returns how many */
function markRange(dlog: DirtyLog, sector: number, sectors: number): number {
  let n = 0;
  const last = Math.min(dlog.regionCount - 1, Math.floor((sector + sectors - 1) / dlog.regionSize));
  for (let r = Math.floor(sector / dlog.regionSize); r <= last; r++) if (outOfSync(dlog, r)) n++;
  return n;
}

/** mark the regions of `dlog` that overlap activity-log extents `extents` (LAST_EXTENT: it and the rest of the device); returns how many */
function markExtents(dlog: DirtyLog, extents: readonly number[]): number {
  let n = 0;
  for (const x of extents) n += markRange(dlog, x * EXTENT_SECTORS, x === LAST_EXTENT ? Infinity : EXTENT_SECTORS);
  return n;
}

/** mark the regions of `dlog` that overlap a set bit of `needs` (whose region size may differ); returns how many */
function markNeeds(dlog: DirtyLog, needs: Needs): number {
  let n = 0;
  const count = needs.bits.length * 8;
  for (let i = 0; i < count; i++) {
    if ((needs.bits[i >> 3]! & (1 << (i & 7))) === 0) continue;
    n += markRange(dlog, i * needs.regionSectors, needs.regionSectors);
  }
  return n;
}

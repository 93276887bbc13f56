/**
 * One remote site of a replicator group: its state and what the group sees of it, the
 * fall-behind measures and policy, the switch to the dirty-log fallback (`log` mode:
 * entries are marked in the site's dirty logs instead of shipped) and back once resync has
 * copied what differs, down and retest after a failure, its messages, and the position a
 * checkpoint records. Its parts: the loop that carries the log's entries to the site in log
 * order (epochs one after the other, an epoch's entries concurrently) is the `Shipper`
 * (replicator-shipper.ts); the dirty logs and the resync and verify runs over them (through
 * the copy service) are `SiteLogs` (replicator-site-logs.ts).
 *
 * Modes: `ship` (in-order, the site's image is a prefix of the group's writes) and `log`
 * (its dirty logs say what differs; resync copies it; the image is not order-consistent).
 * Health: up or down (a failed I/O; retested every `retestMs`).
 */
import { BlockError, toBlockError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { EventDetail } from '../core/types.ts';
import type { SlinkPosition } from '../replog/types.ts';
import type { FallBehind, SiteLink, SlinkPolicy } from '../slink/types.ts';
import { FLUSH, Shipper } from './replicator-shipper.ts';
import { SiteLogs } from './replicator-site-logs.ts';
import type { DevBinding, SiteHost } from './replicator-types.ts';

/** a site over its fall-behind is back under at this fraction of the threshold */
const LEAVE_FRACTION = 0.9;
/** how long a leaving device waits for a healthy site to take its backlog before it goes to the dirty logs */
const RELEASE_WAIT_MS = 2000;

export type SiteState = 'S' | 'A' | 'F' | 'P' | 'R' | 'D';
type LogReason = 'pull-ahead' | 'overflow' | 'resync' | 'dirty' | 'demoted';

export interface SiteStats {
  shippedIos: number;
  shippedBytes: number;
  /** bytes resync sent to the site (a checksum resync: only the blocks that differed) */
  resyncedBytes: number;
  /** bytes compared by block digests (checksum resync and verify) */
  comparedBytes: number;
  errors: number;
}

export class Site {
  readonly slink: number;
  readonly link: SiteLink;
  policy: SlinkPolicy;
  policyText: string | null;
  fallBehind: FallBehind | null;
  fallBehindText: string | null;
  readonly stats: SiteStats = { shippedIos: 0, shippedBytes: 0, resyncedBytes: 0, comparedBytes: 0, errors: 0 };
  /** why the site is down (or its dirty log could not be flushed); '' once it is back, and at a role change */
  lastError = '';

  readonly #host: SiteHost;
  readonly #log: Logger;
  #mode: 'ship' | 'log' = 'ship';
  #logReason: LogReason | null = null;
  #up = true;
  /** `slink suspend`: no shipping until `slink resume` */
  #paused = false;
  #active = false;
  #forced = false;
  #stalled = false;
  /** the loop: watermark, entries in flight, and who waits for the watermark */
  readonly #shipper: Shipper;
  #stallWaiters: Array<() => void> = [];
  /** entries up to here may have reached the site before the restart (see `consistent`) */
  #reshipUntil = 0;
  #durable: { seq: number; mode: 'ship' | 'log' } = { seq: 0, mode: 'ship' };
  #retest: NodeJS.Timeout | null = null;
  /** the dirty logs, and the resync and verify runs over them */
  readonly #logs: SiteLogs;

  constructor(host: SiteHost, link: SiteLink, policy: SlinkPolicy, policyText: string | null, fallBehind: FallBehind | null, fallBehindText: string | null) {
    this.#host = host;
    this.link = link;
    this.slink = link.slink;
    this.policy = policy;
    this.policyText = policyText;
    this.fallBehind = fallBehind;
    this.fallBehindText = fallBehindText;
    this.#log = host.logger;
    this.#logs = new SiteLogs(host, this, (err) => {
      if (this.#active) this.#down(err);
    });
    this.#shipper = new Shipper(host, {
      slink: this.slink,
      stats: this.stats,
      mode: () => this.#mode,
      canRun: () => this.#canRun(),
      mark: (e, b) => this.#logs.mark(e, b),
      completed: () => this.#checkFallBehind(),
      down: (err) => this.#down(err),
      failed: (err) => this.#failed(err),
    });
  }

  // ---- state seen by the group ----

  get mode(): 'ship' | 'log' {
    return this.#mode;
  }
  get up(): boolean {
    return this.#up;
  }
  get paused(): boolean {
    return this.#paused;
  }
  get watermark(): number {
    return this.#shipper.watermark;
  }
  /** the oldest log entry a ship to this site may still be reading (Infinity: none in flight) */
  get oldestHeld(): number {
    return this.#shipper.oldestHeld;
  }
  get stalled(): boolean {
    return this.#stalled && this.#up && this.#mode === 'ship';
  }
  get resyncing(): boolean {
    return this.#logs.resyncing;
  }
  get lastVerify(): { differing: number; regions: number } | null {
    return this.#logs.lastVerify;
  }

  /** Is a write acknowledged only once this site has it (policy sync, or forced by fall-behind)? */
  get synchronous(): boolean {
    return this.#active && this.#up && !this.#paused && this.#mode === 'ship' && (this.policy.mode === 'sync' || this.#forced);
  }

  /**
   * Does a ship to this site take a network round trip (every transport but `blockdev`, or
   * its alias `local`, whose cached file writes complete on the spot)? A write waiting for
   * such a site lets the entry go out before its own local write (replicator-group.ts write).
   */
  get overNetwork(): boolean {
    return this.link.overNetwork !== false;
  }

  /** status character (REPLICATION.md "Status") */
  get state(): SiteState {
    if (!this.#up || this.#paused) return 'D';
    if (this.#mode === 'log') return this.#logReason === 'pull-ahead' ? 'P' : 'R';
    if (this.policy.mode === 'sync') return 'S';
    return this.#forced ? 'F' : 'A';
  }

  get stateName(): string {
    const names: Record<SiteState, string> = { S: 'synchronous', A: 'asynchronous', F: 'forced-synchronous', P: 'pulled-ahead', R: 'resyncing', D: 'down' };
    return this.#paused ? 'suspended' : names[this.state];
  }

  /** a change at this site: logged and raised as a device event naming the slink and the state it is in now */
  event(what: string, detail?: EventDetail): void {
    this.#host.event(what, { slink: this.slink, state: this.stateName, ...detail });
  }

  outstandingIos(): number {
    return Math.max(0, this.#host.head - this.#shipper.watermark);
  }
  outstandingSectors(): number {
    return Math.max(0, this.#host.appendedSectors - this.#shipper.doneSectors);
  }
  /** age in ms of the oldest entry not yet shipped (0 when none) */
  lagMs(): number {
    if (this.#shipper.watermark >= this.#host.head) return 0;
    return Math.max(0, Date.now() - this.#host.appendTime(this.#shipper.watermark + 1));
  }

  // ---- lifecycle ----

  /** the group recovered its log: start from the checkpoint's position for this slink */
  init(pos: SlinkPosition, head: number, backlogSectors: number): void {
    const seq = Math.min(pos.seq, head);
    this.#shipper.init(seq, backlogSectors);
    this.#reshipUntil = head;
    this.#durable = { seq, mode: pos.mode };
    if (pos.mode === 'log') {
      this.#mode = 'log';
      this.#logReason = 'dirty';
    }
  }

  /** go (first resume, or resume after suspend) */
  start(): void {
    this.#active = true;
    if (!this.#up) this.#scheduleRetest(); // went down (refused) while not active
    this.#checkDirty();
    this.#shipper.run();
  }

  /** stop shipping and resync; wait for I/O in flight (suspend, destroy) */
  async stop(): Promise<void> {
    this.#active = false;
    this.#shipper.cancel();
    this.#logs.abortResync();
    this.#failPositions();
    if (this.#retest) clearTimeout(this.#retest);
    this.#retest = null;
    await this.#logs.stopResync();
    await this.#shipper.settled();
    await this.#shipper.loop;
    this.#shipper.releaseSync();
    this.#releaseStall();
  }

  /** the group appended an entry */
  appended(): void {
    this.#shipper.wake();
    this.#checkFallBehind();
  }

  /** device `b` was bound (maybe its dirty logs say it is out of sync here) */
  bound(b: DevBinding): void {
    this.#checkDirty();
    this.#shipper.wake();
    // a site across a network that could not be reached when the device attached (its
    // transport takes the device anyway: a daemon starting while the site is away) is found
    // down now and retested, rather than at the first write
    const r = b.remotes.get(this.slink);
    const probing = (): boolean => this.#up && this.#active && !this.#paused && !this.#host.role.secondary;
    if (r && this.overNetwork && probing()) {
      void r.dev.test().catch((err: unknown) => {
        // not for a device gone meanwhile (removed, reloaded: its requests end ESHUTDOWN)
        if (this.#host.binding(b.devNr) !== b || (err as { code?: string }).code === 'ESHUTDOWN') return;
        if (probing()) this.#down(err);
      });
    }
  }

  /**
   * A device leaves the group (its replicator-dev is removed, not replaced): the entries of
   * it this site has not taken yet are marked in its dirty logs here (flushed), and skipped
   * later, so the site never waits for a device that is gone. If it comes back, its dirty
   * logs send this site into resync. A resync running may be copying the device's regions:
   * it stops (its copies in flight done) before the device is detached, and starts again
   * for the devices that stay (the caller has unbound `b`).
   */
  async release(b: DevBinding): Promise<void> {
    if (this.#logs.resyncing) {
      await this.#logs.stopResync();
      this.#startResync();
    }
    const r = b.remotes.get(this.slink);
    const head = this.#host.head;
    if (!r || this.#shipper.watermark >= head) return;
    if (this.#mode === 'ship' && this.#up && !this.#paused && this.#active) {
      // a healthy site usually takes the rest in a moment (a clean shutdown): keep it in order
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([this.waitPosition(head).catch(() => undefined), new Promise<void>((res) => (timer = setTimeout(res, RELEASE_WAIT_MS)))]);
      clearTimeout(timer);
      if (this.#shipper.watermark >= head) return;
    }
    const reader = this.#host.log.reader(this.#shipper.watermark + 1);
    for (let e = await reader.next(); e && e.seq <= head; e = await reader.next()) {
      if (e.devNr === b.devNr) this.#logs.mark(e, b);
    }
    await r.dlog.flush();
    this.#shipper.skip(b.devNr, head);
    // its writes still on their way to the site (marked too) land before its devices close
    await this.#shipper.settledDev(b.devNr);
  }

  /** the shipper looks again at what it waits for (a device leaving is shipped through its binding until released) */
  wake(): void {
    this.#shipper.wake();
  }

  /** a device left the group with nothing recorded for this site (recovery, `forget`): its entries up to `seq` are skipped */
  skip(devNr: number, seq: number): void {
    this.#shipper.skip(devNr, seq);
  }

  /** periodic: fall-behind by age */
  tick(): void {
    if (this.fallBehind?.kind === 'timeout') this.#checkFallBehind();
  }

  /** resolves once `seq` is on the site, or once the site is no longer synchronous */
  waitShipped(seq: number): Promise<void> {
    if (this.#shipper.watermark >= seq || !this.synchronous) return Promise.resolve();
    return this.#shipper.waitShipped(seq);
  }

  /** resolves once the site is not stalling writers */
  waitUnstalled(): Promise<void> {
    if (!this.stalled) return Promise.resolve();
    return new Promise((resolve) => this.#stallWaiters.push(resolve));
  }

  // ---- what the loop asks of the site (replicator-shipper.ts) ----

  #canRun(): boolean {
    return this.#active && (this.#mode === 'log' || (this.#up && !this.#paused));
  }

  #failed(err: unknown): void {
    const code = (err as { code?: string }).code;
    if (code === 'EOVERFLOW') {
      // the entries this site needs are gone from the ring: whole resync from the dirty logs
      this.#log.warn(`slink ${this.slink}: log entries already dropped; falling back to a full resync`);
      this.#shipper.watermark = this.#host.head;
      this.#logs.markAll();
      this.#enterLog('dirty');
      return;
    }
    this.#down(err);
  }

  // ---- waiters ----

  #releaseStall(): void {
    const w = this.#stallWaiters;
    this.#stallWaiters = [];
    for (const f of w) f();
  }

  /**
   * Resolves once the watermark reaches `seq`. In log mode marking never stops; in ship
   * mode it rejects (EIO) when the site goes down or is suspended first, and at once if it
   * already is. For replicator-resync.ts and the group.
   */
  waitPosition(seq: number): Promise<void> {
    if (this.#shipper.watermark >= seq) return Promise.resolve();
    if (!this.#canRun()) return Promise.reject(this.#notShipping());
    return this.#shipper.waitPosition(seq);
  }

  #notShipping(): BlockError {
    return new BlockError('EIO', `slink ${this.slink} is ${this.#paused ? 'suspended' : this.#up ? 'stopped' : 'down'}`);
  }

  /** the loop stopped in ship mode: nobody waits for a position it will not reach */
  #failPositions(): void {
    this.#shipper.failPositions(this.#notShipping());
  }

  // ---- fall-behind ----

  /**
   * Over the threshold; once over (`engaged`), still over until back under LEAVE_FRACTION
   * of it, so a site hovering at its threshold does not flip state on every write.
   */
  #exceeded(engaged: boolean): boolean {
    const fb = this.fallBehind;
    if (!fb) return false;
    const f = engaged ? LEAVE_FRACTION : 1;
    if (fb.kind === 'ios') return this.outstandingIos() > fb.value * f;
    if (fb.kind === 'size') return this.outstandingSectors() > fb.sectors * f;
    return this.lagMs() > fb.ms * f;
  }

  #checkFallBehind(): void {
    if (this.policy.mode === 'sync' || !this.fallBehind || this.#mode !== 'ship' || !this.#up) {
      this.#setForced(false);
      this.#setStalled(false);
      return;
    }
    const over = this.#exceeded(this.#forced || this.#stalled);
    if (this.policy.onFallBehind === 'sync') this.#setForced(over);
    else if (this.policy.onFallBehind === 'stall') this.#setStalled(over);
    else if (over) this.#enterLog('pull-ahead');
  }

  /** `said`: the event, unless the caller says what happens instead (the site goes to its dirty logs) */
  #setForced(v: boolean, said = true): void {
    if (this.#forced === v) return;
    this.#forced = v;
    if (!v) this.#shipper.releaseSync();
    if (said) this.event(`slink ${this.slink} ${v ? 'fell behind: synchronous' : 'back under its fall-behind: asynchronous'}`);
  }

  #setStalled(v: boolean, said = true): void {
    if (this.#stalled === v) return;
    this.#stalled = v;
    if (!v) this.#releaseStall();
    if (said) this.event(`slink ${this.slink} ${v ? 'fell behind: stalling writers' : 'back under its fall-behind'}`);
  }

  // ---- down, retest ----

  #down(err: unknown): void {
    const e = toBlockError(err);
    this.stats.errors++;
    this.lastError = e.message;
    const wasUp = this.#up;
    this.#up = false;
    if (this.#mode === 'ship') { // in log mode the loop only marks: it goes on
      this.#shipper.cancel();
      this.#failPositions();
    }
    if (wasUp) {
      this.#log.warn(`slink ${this.slink} (${this.link.type}) down: ${e.message}`);
      this.#shipper.releaseSync();
      this.#releaseStall();
      void this.#logs.stopResync();
      this.event(`slink ${this.slink} down`);
    }
    this.#scheduleRetest();
  }

  #scheduleRetest(): void {
    if (this.#retest || !this.#active) return;
    this.#retest = setTimeout(() => {
      this.#retest = null;
      void this.retest();
    }, this.link.retestMs);
    this.#retest.unref?.();
  }

  /**
   * The site refused our stream for its role (tcp: it is primary too, a split brain,
   * unrelated data): it is down until a retest gets in, whether or not anything was shipped.
   */
  refused(err: unknown): void {
    if (this.#up && !this.#host.role.secondary) this.#down(err);
  }

  /** test every device at the site (a link that is not connected connects first) */
  async #test(): Promise<void> {
    for (const b of this.#host.bindings()) {
      const r = b.remotes.get(this.slink);
      if (r) await r.dev.test();
    }
  }

  /** test every device at the site; up again if all work. A secondary tests nothing (it connects to nobody; `activate` tests) */
  async retest(): Promise<boolean> {
    if (this.#up || !this.#active || this.#host.role.secondary) return this.#up;
    try {
      await this.#test();
    } catch (err) {
      this.lastError = toBlockError(err).message;
      this.#scheduleRetest();
      return false;
    }
    if (this.#up || !this.#active) return this.#up;
    this.#up = true;
    this.lastError = '';
    this.#log.warn(`slink ${this.slink} (${this.link.type}) is back`);
    this.event(`slink ${this.slink} up`);
    this.#shipper.restart();
    this.#startResync();
    return true;
  }

  // ---- dirty-log mode and resync ----

  /** any bound device with out-of-sync regions at this site → log mode */
  #checkDirty(): void {
    if (this.#mode === 'log') {
      this.#startResync();
      return;
    }
    if (this.#logs.anyOutOfSync()) this.#enterLog('dirty');
  }

  /** stop shipping: mark the backlog and every later entry in the dirty logs; resync when up */
  #enterLog(reason: LogReason): void {
    if (this.#mode === 'log') return;
    this.#mode = 'log';
    this.#logReason = reason;
    this.#setForced(false, false); // (not back under anything: the event below says what it is)
    this.#setStalled(false, false);
    this.#shipper.releaseSync();
    this.event(`slink ${this.slink} on its dirty logs (${reason})`);
    this.#shipper.restart();
    this.#startResync();
    this.announce();
  }

  /**
   * The ring is full and this site holds it: go to the dirty logs; resolves once every
   * entry appended so far is marked (the next checkpoint frees them).
   */
  overflow(): Promise<void> {
    this.#enterLog('overflow');
    return this.waitPosition(this.#host.head);
  }

  /** `resync <slink#> [full] [checksum]` */
  requestResync(full: boolean, checksum = false): void {
    if (full) this.#logs.markAll();
    if (checksum) this.#logs.useChecksum();
    this.#enterLog('resync');
    if (!this.#up) void this.retest();
  }

  /** `clear-bitmap <slink#>`: declare the site in sync now (seeding); ships from the head on */
  clearBitmap(): Promise<void> {
    return this.#logs.clearBitmap();
  }

  /** regions out of sync at this site, over every bound device */
  outOfSync(): number {
    return this.#logs.outOfSync();
  }

  /**
   * Resync is done (writers held, every entry marked): ship in order from the head on. The
   * site holds our generation now (`declared`: the operator said so, clear-bitmap), except
   * at a promotion, where the dirty logs start afresh and the site is judged at its OPEN.
   */
  toShip(declared = true): void {
    this.#mode = 'ship';
    this.#logReason = null;
    this.#shipper.watermark = this.#host.head;
    this.event(`slink ${this.slink} in sync: shipping in order`);
    this.#shipper.restart();
    if (declared) this.announce();
    this.#host.checkpointSoon(); // recorded now: a crash soon after restarts it in order, not on its dirty logs
  }

  /**
   * Tell the site where it stands (transports that carry roles: tcp): in ship mode it holds
   * the group's generation in order, which the group notes for it; in log mode it is being
   * resynced (inconsistent).
   */
  announce(): void {
    if (this.#host.role.secondary) return;
    const gen = this.#host.role.current;
    const consistent = this.#mode === 'ship';
    // recorded before the site is told (the state file before the change it records), whether
    // or not a retest has marked it up yet (its OPEN, which led here, ran inside the retest):
    // once the site may hold `gen`, a write while it is away must start a new generation
    if (consistent) this.#host.role.peerHas(this.slink, gen);
    this.link.announce?.({ gen, consistent, role: 'primary' });
  }

  /**
   * The group is demoted: ship nothing more; every entry not shipped goes to the dirty logs
   * (flushed), which then say what a new primary must overwrite here.
   */
  async passivate(): Promise<void> {
    await this.#logs.stopResync();
    this.#enterLog('demoted');
    await this.waitPosition(this.#host.head).catch(() => undefined);
    for (const b of this.#host.bindings()) await b.remotes.get(this.slink)?.dlog.flush();
    // a secondary connects to nobody and tests no site: not down, no error (a refusal of our
    // stream, for one, ends with our primary role); `activate` tests the site again
    if (this.#retest) clearTimeout(this.#retest);
    this.#retest = null;
    this.#up = true;
    this.lastError = '';
  }

  /** after every site passivated: tell the site the group is secondary, and whether every site holds all it wrote */
  announceDemoted(allInSync: boolean): void {
    this.link.announce?.({ gen: this.#host.role.current, consistent: false, role: 'secondary', allInSync });
  }

  /**
   * The group is promoted: the dirty logs start afresh (they will record what is written
   * from now on) and the site ships from the head; when it answers, its OPEN says whether
   * it needs a resync (the regions it changed and we lack).
   */
  async activate(): Promise<void> {
    await this.#logs.stopResync();
    this.lastError = '';
    await this.#logs.clearBitmap(false);
    // a secondary's link connected to nobody: reach the site now (its OPEN is judged), not
    // at the first entry shipped, which would find the link down and fail
    if (!this.#up) void this.retest();
    else void this.#test().catch((err: unknown) => {
      if (this.#up && this.#active && !this.#host.role.secondary) this.#down(err);
    });
  }

  /** a resync runs while the site is active, up, not suspended and in log mode (SiteLogs), and the group is primary */
  /** a resync, if the site is in a state to run one (SiteLogs: after one that was stopping ended) */
  resyncIfDue(): void {
    this.#startResync();
  }

  #startResync(): void {
    if (!this.#active || !this.#up || this.#paused || this.#mode !== 'log' || this.#host.role.secondary) return;
    this.#logs.startResync();
  }

  // ---- messages ----

  setPolicy(policy: SlinkPolicy, text: string): void {
    this.policy = policy;
    this.policyText = text;
    if (policy.mode === 'sync') {
      this.fallBehind = null;
      this.fallBehindText = null;
    }
    this.#checkFallBehind();
    this.#shipper.releaseSync();
    this.event(`slink ${this.slink} policy ${text}`);
  }

  setFallBehind(fb: FallBehind | null, text: string | null): void {
    this.fallBehind = fb;
    this.fallBehindText = text;
    this.#checkFallBehind();
    this.event(`slink ${this.slink} fall-behind ${text ?? 'none'}`);
  }

  pause(): void {
    if (this.#paused) return;
    this.#paused = true;
    this.#shipper.cancel();
    if (this.#mode === 'ship') this.#failPositions();
    this.#shipper.releaseSync();
    this.#releaseStall();
    void this.#logs.stopResync();
    this.event(`slink ${this.slink} suspended`);
    if (this.#mode === 'log') this.#shipper.restart(); // marking goes on while suspended
  }

  unpause(): void {
    if (!this.#paused) return;
    this.#paused = false;
    this.event(`slink ${this.slink} resumed`);
    this.#shipper.restart();
    this.#startResync();
  }

  // ---- checkpoints and progress ----

  /**
   * The position a checkpoint may record: the watermark once what it covers is durable
   * (the site flushed in ship mode, the dirty logs flushed in log mode); the previous one
   * if that failed or the site is down.
   */
  async position(): Promise<SlinkPosition> {
    const seq = this.#shipper.watermark;
    const mode = this.#mode;
    if (seq !== this.#durable.seq || mode !== this.#durable.mode) {
      try {
        // (a device being removed too: the shipper still ships or marks its entries)
        if (mode === 'log') {
          for (const b of this.#host.bindingsAndLeaving()) await b.remotes.get(this.slink)?.dlog.flush();
          this.#durable = { seq, mode };
        } else if (this.#up && !this.#paused) {
          for (const b of this.#host.bindingsAndLeaving()) await b.remotes.get(this.slink)?.dev.submit(FLUSH);
          if (this.#mode === mode) this.#durable = { seq, mode };
        }
      } catch (err) {
        if (mode === 'ship') this.#down(err);
        else { // a dirty log that cannot be written: the position stays where it was made good
          this.stats.errors++;
          this.lastError = toBlockError(err).message;
          this.#log.limited('dlog-flush', `slink ${this.slink}: dirty log flush failed, position kept at ${this.#durable.seq}: ${this.lastError}`);
        }
      }
    }
    return { slink: this.slink, seq: this.#durable.seq, mode: this.#durable.mode };
  }

  /** sectors per region of this site's dirty logs (0 when no device is bound) */
  regionSectors(): number {
    return this.#logs.regionSectors();
  }

  /**
   * `verify <slink#>` (replicator-resync.ts verifySite): resolves with the number of
   * differing regions, now out of sync (a following `resync` repairs them).
   */
  verify(): Promise<number> {
    return this.#logs.verify();
  }

  /**
   * Resync or verify progress in sectors; null when neither runs nor will run by itself. A
   * site on its dirty logs that is suspended, or of a secondary group, resyncs nothing until
   * an operator acts: it shows no progress (its out-of-sync regions are in status), so
   * `dmkit wait --progress` of the group ends when the rest is done instead of waiting for
   * a site the operator suspended. A down site does count: it is retested, and resyncs once
   * it answers (waiting for it is what `wait --progress` after a repair is for).
   */
  progress(): { work: string; done: number; total: number } | null {
    const canResync = this.#mode === 'log' && this.#active && !this.#paused && !this.#host.role.secondary;
    return this.#logs.progress(canResync);
  }

  /**
   * In-order image? False in dirty-log mode, and after a restart until the site has
   * passed the log's head at recovery: entries since the last checkpoint are shipped a
   * second time, and until they all are, an older write may sit over a newer one.
   */
  get consistent(): boolean {
    return this.#mode === 'ship' && this.#shipper.watermark >= this.#reshipUntil;
  }
}

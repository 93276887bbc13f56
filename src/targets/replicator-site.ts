/**
 * One remote site of a replicator group: the shipper that carries the log's entries to the
 * site in log order (epochs one after the other, an epoch's entries concurrently), the
 * fall-behind measures and policy, the dirty-log fallback (`log` mode: entries are marked
 * in the site's dirty logs instead of shipped), retest after a failure, and resync through
 * the copy service until the site can ship in order again.
 *
 * Modes: `ship` (in-order, the site's image is a prefix of the group's writes) and `log`
 * (its dirty logs say what differs; resync copies it; the image is not order-consistent).
 * Health: up or down (a failed I/O; retested every `retestMs`).
 */
import type { Bio } from '../core/bio.ts';
import { EMPTY } from '../core/bio.ts';
import { BlockError, toBlockError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { ReplogEntry, SlinkPosition } from '../replog/types.ts';
import type { FallBehind, SiteLink, SlinkPolicy } from '../slink/types.ts';
import { resyncPasses, verifySite, type ResyncHandle } from './replicator-resync.ts';
import type { DevBinding, SiteHost } from './replicator-types.ts';

/** entries in flight to one site */
const MAX_INFLIGHT = 32;
/** a site over its fall-behind is back under at this fraction of the threshold */
const LEAVE_FRACTION = 0.9;
/** how long a leaving device waits for a healthy site to take its backlog before it goes to the dirty logs */
const RELEASE_WAIT_MS = 2000;
const FLUSH: Bio = { op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} };
const FUA = { fua: true } as const;
const NONE = {} as const;

export type SiteState = 'S' | 'A' | 'F' | 'P' | 'R' | 'D';
type LogReason = 'pull-ahead' | 'overflow' | 'resync' | 'dirty';

export interface SiteStats {
  shippedIos: number;
  shippedBytes: number;
  resyncedBytes: number;
  errors: number;
}

export class Site {
  readonly slink: number;
  readonly link: SiteLink;
  policy: SlinkPolicy;
  policyText: string | null;
  fallBehind: FallBehind | null;
  fallBehindText: string | null;
  readonly stats: SiteStats = { shippedIos: 0, shippedBytes: 0, resyncedBytes: 0, errors: 0 };
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
  /** every entry with seq ≤ watermark is shipped (ship) or marked (log) */
  #watermark = 0;
  /** last entry handed to the site or marked */
  #issued = 0;
  readonly #inflightSeqs = new Set<number>();
  /** ships in flight of any generation (a new loop starts only when none is) */
  #allInflight = 0;
  #gen = 0;
  #loop: Promise<void> | null = null;
  #wake: (() => void) | null = null;
  #slot: (() => void) | null = null;
  #settledWaiters: Array<() => void> = [];
  #syncWaiters: Array<{ seq: number; resolve: () => void }> = [];
  #posWaiters: Array<{ seq: number; resolve: () => void; reject: (err: Error) => void }> = [];
  #stallWaiters: Array<() => void> = [];
  /** entries up to here may have reached the site before the restart (see `consistent`) */
  #reshipUntil = 0;
  /** sectors shipped or marked since start (outstanding = appended − this) */
  #doneSectors = 0;
  #durable: { seq: number; mode: 'ship' | 'log' } = { seq: 0, mode: 'ship' };
  #retest: NodeJS.Timeout | null = null;
  #resync: { abort: AbortController; done: Promise<void>; total: number; copied: number } | null = null;
  #verify: { done: number; total: number } | null = null;
  lastVerify: { differing: number; regions: number } | null = null;
  /** per device that left the group: its entries up to this seq are in its dirty logs (skipped) */
  readonly #skip = new Map<number, number>();

  constructor(host: SiteHost, link: SiteLink, policy: SlinkPolicy, policyText: string | null, fallBehind: FallBehind | null, fallBehindText: string | null) {
    this.#host = host;
    this.link = link;
    this.slink = link.slink;
    this.policy = policy;
    this.policyText = policyText;
    this.fallBehind = fallBehind;
    this.fallBehindText = fallBehindText;
    this.#log = host.logger;
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
    return this.#watermark;
  }
  get stalled(): boolean {
    return this.#stalled && this.#up && this.#mode === 'ship';
  }
  get resyncing(): boolean {
    return this.#resync !== null;
  }

  /** Is a write acknowledged only once this site has it (policy sync, or forced by fall-behind)? */
  get synchronous(): boolean {
    return this.#active && this.#up && !this.#paused && this.#mode === 'ship' && (this.policy.mode === 'sync' || this.#forced);
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

  outstandingIos(): number {
    return Math.max(0, this.#host.head - this.#watermark);
  }
  outstandingSectors(): number {
    return Math.max(0, this.#host.appendedSectors - this.#doneSectors);
  }
  /** age in ms of the oldest entry not yet shipped (0 when none) */
  lagMs(): number {
    if (this.#watermark >= this.#host.head) return 0;
    return Math.max(0, Date.now() - this.#host.appendTime(this.#watermark + 1));
  }

  // ---- lifecycle ----

  /** the group recovered its log: start from the checkpoint's position for this slink */
  init(pos: SlinkPosition, head: number): void {
    this.#watermark = Math.min(pos.seq, head);
    this.#reshipUntil = head;
    this.#issued = this.#watermark;
    this.#durable = { seq: this.#watermark, mode: pos.mode };
    if (pos.mode === 'log') {
      this.#mode = 'log';
      this.#logReason = 'dirty';
    }
  }

  /** go (first resume, or resume after suspend) */
  start(): void {
    this.#active = true;
    this.#checkDirty();
    this.#run();
  }

  /** stop shipping and resync; wait for I/O in flight (suspend, destroy) */
  async stop(): Promise<void> {
    this.#active = false;
    this.#gen++;
    this.#wakeLoop();
    this.#resync?.abort.abort();
    this.#failPositions();
    if (this.#retest) clearTimeout(this.#retest);
    this.#retest = null;
    await this.#stopResync();
    await this.#settled();
    await this.#loop;
    this.#releaseSync();
    this.#releaseStall();
  }

  /** the group appended an entry */
  appended(): void {
    this.#wakeLoop();
    this.#checkFallBehind();
  }

  /** a device was bound (maybe its dirty logs say it is out of sync here) */
  bound(): void {
    this.#checkDirty();
    this.#wakeLoop();
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
    if (this.#resync) {
      await this.#stopResync();
      this.#startResync();
    }
    const r = b.remotes.get(this.slink);
    const head = this.#host.head;
    if (!r || this.#watermark >= head) return;
    if (this.#mode === 'ship' && this.#up && !this.#paused && this.#active) {
      // a healthy site usually takes the rest in a moment (a clean shutdown): keep it in order
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([this.waitPosition(head).catch(() => undefined), new Promise<void>((res) => (timer = setTimeout(res, RELEASE_WAIT_MS)))]);
      clearTimeout(timer);
      if (this.#watermark >= head) return;
    }
    const reader = this.#host.log.reader(this.#watermark + 1);
    for (let e = await reader.next(); e && e.seq <= head; e = await reader.next()) {
      if (e.devNr === b.devNr) this.#mark(e, b);
    }
    await r.dlog.flush();
    this.#skip.set(b.devNr, head);
    this.#wakeLoop();
  }

  /** periodic: fall-behind by age */
  tick(): void {
    if (this.fallBehind?.kind === 'timeout') this.#checkFallBehind();
  }

  /** resolves once `seq` is on the site, or once the site is no longer synchronous */
  waitShipped(seq: number): Promise<void> {
    if (this.#watermark >= seq || !this.synchronous) return Promise.resolve();
    return new Promise((resolve) => this.#syncWaiters.push({ seq, resolve }));
  }

  /** resolves once the site is not stalling writers */
  waitUnstalled(): Promise<void> {
    if (!this.stalled) return Promise.resolve();
    return new Promise((resolve) => this.#stallWaiters.push(resolve));
  }

  // ---- the loop: ship or mark entries in order ----

  #canRun(): boolean {
    return this.#active && (this.#mode === 'log' || (this.#up && !this.#paused));
  }

  #run(): void {
    if (!this.#canRun() || this.#loop) return;
    const gen = ++this.#gen;
    const loop = (async () => {
      await this.#settled();
      if (gen === this.#gen) await this.#process(gen);
    })().catch((err: unknown) => this.#failed(gen, err)).finally(() => {
      if (this.#loop === loop) this.#loop = null;
      if (gen !== this.#gen) this.#run(); // a restart was asked for while this one ran
    });
    this.#loop = loop;
  }

  /** stop the loop and start a new one from the watermark (mode change, recovery) */
  #restart(): void {
    this.#gen++;
    this.#wakeLoop();
    if (!this.#loop) this.#run();
  }

  async #process(gen: number): Promise<void> {
    const reader = this.#host.log.reader(this.#watermark + 1);
    this.#issued = this.#watermark;
    this.#inflightSeqs.clear();
    let epoch = -1;
    while (gen === this.#gen) {
      if (this.#inflightSeqs.size >= MAX_INFLIGHT) {
        await new Promise<void>((r) => (this.#slot = r));
        continue;
      }
      // a run of cached entries is taken in one turn (the writers get one turn each too)
      let e = reader.tryNext ? reader.tryNext() : undefined;
      if (e === undefined) e = await reader.next();
      if (gen !== this.#gen) return;
      if (!e) {
        await new Promise<void>((r) => (this.#wake = r));
        continue;
      }
      let b = this.#host.binding(e.devNr);
      if (!b && e.seq <= (this.#skip.get(e.devNr) ?? 0)) { // its device left the group; its dirty logs have it
        this.#issued = e.seq;
        this.#complete(e);
        continue;
      }
      while (!b && gen === this.#gen) {
        await Promise.race([this.#host.whenBound(e.devNr), new Promise<void>((r) => (this.#wake = r))]);
        b = this.#host.binding(e.devNr);
      }
      if (gen !== this.#gen || !b) return;
      if (this.#mode === 'log') {
        this.#mark(e, b);
        this.#issued = e.seq;
        this.#complete(e);
        continue;
      }
      if (e.epoch !== epoch && this.#inflightSeqs.size > 0) {
        await this.#drainGen(gen);
        if (gen !== this.#gen) return;
      }
      epoch = e.epoch;
      this.#ship(gen, e, b);
    }
  }

  #ship(gen: number, e: ReplogEntry, b: DevBinding): void {
    this.#issued = e.seq;
    const remote = b.remotes.get(this.slink);
    if (!remote) { // this device is not replicated to this site
      this.#complete(e);
      return;
    }
    this.#inflightSeqs.add(e.seq);
    this.#allInflight++;
    const bio: Bio = e.op === 'flush' ? FLUSH : { op: e.op, sector: e.sector, sectors: e.sectors, data: e.data, flags: e.fua ? FUA : NONE };
    remote.dev.submit(bio).then(
      () => {
        this.#settle();
        if (gen !== this.#gen) return;
        this.#inflightSeqs.delete(e.seq);
        this.stats.shippedIos++;
        this.stats.shippedBytes += e.data.length;
        this.#complete(e);
        this.#wakeSlot();
      },
      (err: unknown) => {
        this.#settle();
        if (gen !== this.#gen) return;
        this.#inflightSeqs.delete(e.seq);
        this.#down(err);
      },
    );
  }

  #complete(e: ReplogEntry): void {
    this.#doneSectors += e.sectors;
    let w = this.#issued;
    for (const s of this.#inflightSeqs) if (s - 1 < w) w = s - 1;
    if (w > this.#watermark) {
      this.#watermark = w;
      this.#releaseWaiters();
    }
    this.#checkFallBehind();
  }

  /** log mode: the entry's regions are out of sync at this site */
  #mark(e: ReplogEntry, b: DevBinding): void {
    const r = b.remotes.get(this.slink);
    if (!r || e.op === 'flush' || e.sectors === 0) return;
    const size = r.dlog.regionSize;
    const last = Math.floor((e.sector + e.sectors - 1) / size);
    for (let region = Math.floor(e.sector / size); region <= last; region++) {
      r.dlog.markRegion(region);
      r.dlog.setRegionSync(region, false);
    }
  }

  #drainGen(gen: number): Promise<void> {
    return (async () => {
      while (this.#inflightSeqs.size > 0 && gen === this.#gen) await new Promise<void>((r) => (this.#slot = r));
    })();
  }

  #settle(): void {
    if (--this.#allInflight === 0) {
      const w = this.#settledWaiters;
      this.#settledWaiters = [];
      for (const f of w) f();
    }
    this.#wakeSlot();
  }

  #settled(): Promise<void> {
    if (this.#allInflight === 0) return Promise.resolve();
    return new Promise((r) => this.#settledWaiters.push(r));
  }

  #wakeLoop(): void {
    const w = this.#wake;
    this.#wake = null;
    w?.();
    this.#wakeSlot();
  }

  #wakeSlot(): void {
    const s = this.#slot;
    this.#slot = null;
    s?.();
  }

  #failed(gen: number, err: unknown): void {
    if (gen !== this.#gen) return;
    const code = (err as { code?: string }).code;
    if (code === 'EOVERFLOW') {
      // the entries this site needs are gone from the ring: whole resync from the dirty logs
      this.#log.warn(`slink ${this.slink}: log entries already dropped; falling back to a full resync`);
      this.#watermark = this.#host.head;
      this.#markAll();
      this.#enterLog('dirty');
      return;
    }
    this.#down(err);
  }

  // ---- waiters ----

  #releaseWaiters(): void {
    const w = this.#watermark;
    if (this.#syncWaiters.length) this.#syncWaiters = this.#syncWaiters.filter((x) => (x.seq <= w ? (x.resolve(), false) : true));
    if (this.#posWaiters.length) this.#posWaiters = this.#posWaiters.filter((x) => (x.seq <= w ? (x.resolve(), false) : true));
  }

  #releaseSync(): void {
    const w = this.#syncWaiters;
    this.#syncWaiters = [];
    for (const x of w) x.resolve();
  }

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
    if (this.#watermark >= seq) return Promise.resolve();
    if (!this.#canRun()) return Promise.reject(this.#notShipping());
    return new Promise((resolve, reject) => this.#posWaiters.push({ seq, resolve, reject }));
  }

  #notShipping(): BlockError {
    return new BlockError('EIO', `slink ${this.slink} is ${this.#paused ? 'suspended' : this.#up ? 'stopped' : 'down'}`);
  }

  /** the loop stopped in ship mode: nobody waits for a position it will not reach */
  #failPositions(): void {
    const w = this.#posWaiters;
    this.#posWaiters = [];
    const err = this.#notShipping();
    for (const x of w) x.reject(err);
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

  #setForced(v: boolean): void {
    if (this.#forced === v) return;
    this.#forced = v;
    if (!v) this.#releaseSync();
    this.#host.event(`slink ${this.slink} ${v ? 'fell behind: synchronous' : 'back under its fall-behind: asynchronous'}`);
  }

  #setStalled(v: boolean): void {
    if (this.#stalled === v) return;
    this.#stalled = v;
    if (!v) this.#releaseStall();
    this.#host.event(`slink ${this.slink} ${v ? 'fell behind: stalling writers' : 'back under its fall-behind'}`);
  }

  // ---- down, retest ----

  #down(err: unknown): void {
    const e = toBlockError(err);
    this.stats.errors++;
    this.lastError = e.message;
    if (this.#mode === 'ship') { // in log mode the loop only marks: it goes on
      this.#gen++;
      this.#wakeLoop();
    }
    if (this.#mode === 'ship') {
      const wasUp = this.#up;
      this.#up = false; // so the rejection says down
      this.#failPositions();
      this.#up = wasUp;
    }
    if (this.#up) {
      this.#up = false;
      this.#log.warn(`slink ${this.slink} (${this.link.type}) down: ${e.message}`);
      this.#releaseSync();
      this.#releaseStall();
      void this.#stopResync();
      this.#host.event(`slink ${this.slink} down`);
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

  /** test every device at the site; up again if all work */
  async retest(): Promise<boolean> {
    if (this.#up || !this.#active) return this.#up;
    try {
      for (const b of this.#host.bindings()) {
        const r = b.remotes.get(this.slink);
        if (r) await r.dev.test();
      }
    } catch (err) {
      this.lastError = toBlockError(err).message;
      this.#scheduleRetest();
      return false;
    }
    if (this.#up || !this.#active) return this.#up;
    this.#up = true;
    this.#log.warn(`slink ${this.slink} (${this.link.type}) is back`);
    this.#host.event(`slink ${this.slink} up`);
    this.#restart();
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
    for (const b of this.#host.bindings()) {
      const r = b.remotes.get(this.slink);
      if (r && r.dlog.getSyncCount() < r.dlog.regionCount) {
        this.#enterLog('dirty');
        return;
      }
    }
  }

  /** stop shipping: mark the backlog and every later entry in the dirty logs; resync when up */
  #enterLog(reason: LogReason): void {
    if (this.#mode === 'log') return;
    this.#mode = 'log';
    this.#logReason = reason;
    this.#setForced(false);
    this.#setStalled(false);
    this.#releaseSync();
    this.#host.event(`slink ${this.slink} on its dirty logs (${reason})`);
    this.#restart();
    this.#startResync();
  }

  /**
   * The ring is full and this site holds it: go to the dirty logs; resolves once every
   * entry appended so far is marked (the next checkpoint frees them).
   */
  overflow(): Promise<void> {
    this.#enterLog('overflow');
    return this.waitPosition(this.#host.head);
  }

  /** `resync <slink#> [full]` */
  requestResync(full: boolean): void {
    if (full) this.#markAll();
    this.#enterLog('resync');
    if (!this.#up) void this.retest();
  }

  /** `clear-bitmap <slink#>`: declare the site in sync now (seeding); ships from the head on */
  async clearBitmap(): Promise<void> {
    await this.#stopResync();
    const release = await this.#host.hold();
    try {
      // log mode: every entry so far marked first (then dropped for good); ship mode keeps its backlog
      if (this.#mode === 'log') await this.waitPosition(this.#host.head);
      for (const b of this.#host.bindings()) {
        const r = b.remotes.get(this.slink);
        if (!r) continue;
        for (let i = 0; i < r.dlog.regionCount; i++) {
          r.dlog.setRegionSync(i, true);
          r.dlog.clearRegion(i);
        }
        await r.dlog.flush();
      }
      if (this.#mode === 'log') this.toShip();
      else this.#host.event(`slink ${this.slink}: bitmap cleared`);
    } finally {
      release();
    }
  }

  #markAll(): void {
    for (const b of this.#host.bindings()) {
      const r = b.remotes.get(this.slink);
      if (!r) continue;
      for (let i = 0; i < r.dlog.regionCount; i++) {
        r.dlog.markRegion(i);
        r.dlog.setRegionSync(i, false);
      }
    }
  }

  /** regions out of sync at this site, over every bound device */
  outOfSync(): number {
    let n = 0;
    for (const b of this.#host.bindings()) {
      const r = b.remotes.get(this.slink);
      if (r) n += r.dlog.regionCount - r.dlog.getSyncCount();
    }
    return n;
  }

  /** resync is done (writers held, every entry marked): ship in order from the head on */
  toShip(): void {
    this.#mode = 'ship';
    this.#logReason = null;
    this.#watermark = this.#host.head;
    this.#host.event(`slink ${this.slink} in sync: shipping in order`);
    this.#restart();
  }

  #startResync(): void {
    if (this.#resync || !this.#active || !this.#up || this.#paused || this.#mode !== 'log') return;
    const abort = new AbortController();
    const handle = { abort, total: 0, copied: 0, done: Promise.resolve() };
    handle.done = resyncPasses(this, this.#host, handle).catch((err: unknown) => {
      if ((err as { code?: string }).code !== 'EINTR' && !abort.signal.aborted && this.#active) this.#down(err);
    }).finally(() => {
      if (this.#resync === handle) this.#resync = null;
    });
    this.#resync = handle;
  }

  async #stopResync(): Promise<void> {
    const r = this.#resync;
    if (!r) return;
    r.abort.abort();
    await r.done;
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
    this.#releaseSync();
    this.#host.event(`slink ${this.slink} policy ${text}`);
  }

  setFallBehind(fb: FallBehind | null, text: string | null): void {
    this.fallBehind = fb;
    this.fallBehindText = text;
    this.#checkFallBehind();
    this.#host.event(`slink ${this.slink} fall-behind ${text ?? 'none'}`);
  }

  pause(): void {
    if (this.#paused) return;
    this.#paused = true;
    this.#gen++;
    this.#wakeLoop();
    if (this.#mode === 'ship') this.#failPositions();
    this.#releaseSync();
    this.#releaseStall();
    void this.#stopResync();
    this.#host.event(`slink ${this.slink} suspended`);
    if (this.#mode === 'log') this.#restart(); // marking goes on while suspended
  }

  unpause(): void {
    if (!this.#paused) return;
    this.#paused = false;
    this.#host.event(`slink ${this.slink} resumed`);
    this.#restart();
    this.#startResync();
  }

  // ---- checkpoints and progress ----

  /**
   * The position a checkpoint may record: the watermark once what it covers is durable
   * (the site flushed in ship mode, the dirty logs flushed in log mode); the previous one
   * if that failed or the site is down.
   */
  async position(): Promise<SlinkPosition> {
    const seq = this.#watermark;
    const mode = this.#mode;
    if (seq !== this.#durable.seq || mode !== this.#durable.mode) {
      try {
        if (mode === 'log') {
          for (const b of this.#host.bindings()) await b.remotes.get(this.slink)?.dlog.flush();
          this.#durable = { seq, mode };
        } else if (this.#up && !this.#paused) {
          for (const b of this.#host.bindings()) await b.remotes.get(this.slink)?.dev.submit(FLUSH);
          if (this.#mode === mode) this.#durable = { seq, mode };
        }
      } catch (err) {
        if (mode === 'ship') this.#down(err);
      }
    }
    return { slink: this.slink, seq: this.#durable.seq, mode: this.#durable.mode };
  }

  /** sectors per region of this site's dirty logs (0 when no device is bound) */
  regionSectors(): number {
    for (const b of this.#host.bindings()) {
      const r = b.remotes.get(this.slink);
      if (r) return r.dlog.regionSize;
    }
    return 0;
  }

  /**
   * `verify <slink#>` (replicator-resync.ts verifySite): resolves with the number of
   * differing regions, now out of sync (a following `resync` repairs them).
   */
  async verify(): Promise<number> {
    if (!this.#up || this.#paused) throw new BlockError('EIO', `slink ${this.slink} is ${this.#paused ? 'suspended' : 'down'}: nothing to verify against`);
    let total = 0;
    for (const b of this.#host.bindings()) total += b.remotes.get(this.slink)?.dlog.regionCount ?? 0;
    this.#verify = { done: 0, total };
    try {
      this.lastVerify = await verifySite(this, this.#host, this.#verify);
    } finally {
      this.#verify = null;
    }
    this.#host.event(`slink ${this.slink} verified: ${this.lastVerify.differing} region(s) differ`);
    return this.lastVerify.differing;
  }

  /** resync or verify progress in sectors; null when neither runs */
  progress(): { work: string; done: number; total: number } | null {
    const size = this.regionSectors();
    if (this.#verify) return { work: 'verify', done: this.#verify.done * size, total: this.#verify.total * size };
    if (this.#mode !== 'log') return null;
    let total = 0;
    for (const b of this.#host.bindings()) {
      const r = b.remotes.get(this.slink);
      if (r) total += r.dlog.regionCount * r.dlog.regionSize;
    }
    return { work: 'resync', done: total - this.outOfSync() * size, total };
  }

  /**
   * In-order image? False in dirty-log mode, and after a restart until the site has
   * passed the log's head at recovery: entries since the last checkpoint are shipped a
   * second time, and until they all are, an older write may sit over a newer one.
   */
  get consistent(): boolean {
    return this.#mode === 'ship' && this.#watermark >= this.#reshipUntil;
  }
}

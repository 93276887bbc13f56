/**
 * The ordered loop of one remote site (replicator-site.ts): it reads the log from the
 * site's watermark on and, in `ship` mode, hands each entry to the site's device for it,
 * epochs one after the other and an epoch's entries concurrently (up to MAX_INFLIGHT),
 * or, to a site that orders epochs itself (`ordersEpochs`: tcp), the next epoch's entries
 * without waiting for the previous one's acknowledgements (up to MAX_PIPELINED entries and
 * MAX_PIPELINED_BYTES); in
 * `log` mode it has the site mark each entry in its dirty logs instead. The watermark moves
 * as entries complete, and releases whoever waits for it (writers of a synchronous site,
 * positions).
 *
 * A loop belongs to a generation: the site ends it (`cancel`; `restart` also starts the
 * next one); ships still in flight of an old generation change nothing when they complete,
 * and a new loop starts only once none of any generation is in flight.
 */
import type { Bio } from '../core/bio.ts';
import { EMPTY } from '../core/bio.ts';
import type { ReplogEntry } from '../replog/types.ts';
import type { SiteStats } from './replicator-site.ts';
import type { DevBinding, SiteHost } from './replicator-types.ts';

/** entries in flight to one site that drains each epoch (blockdev, nbd) */
const MAX_INFLIGHT = 32;
/**
 * entries and bytes in flight to a site that orders epochs itself (tcp, pipelined): the
 * window a round trip has to cover is many epochs deep (R1-tcp at 4 KiB x32: 32 entries
 * overflowed the ring, 128 kept up); its receiver bounds what it holds in bytes too
 */
const MAX_PIPELINED = 256;
const MAX_PIPELINED_BYTES = 32 << 20;
/** a flush of the site's device (a flush entry; the site's checkpoint flushes with it too) */
export const FLUSH: Bio = { op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} };
const FUA = { fua: true } as const;
const NONE = {} as const;

/** What the loop needs from its site. */
export interface ShipperSite {
  readonly slink: number;
  /** shipped I/Os and bytes are counted here */
  readonly stats: SiteStats;
  /** ship the entries, or mark them in the dirty logs */
  mode(): 'ship' | 'log';
  /** may a loop run now (the site active, and up and not suspended unless in log mode)? */
  canRun(): boolean;
  /** log mode: the entry's regions go out of sync at the site */
  mark(e: ReplogEntry, b: DevBinding): void;
  /** an entry was shipped or marked (the watermark may have moved): check the fall-behind */
  completed(): void;
  /** a ship of the current generation failed: the site is down */
  down(err: unknown): void;
  /** the loop of the current generation failed (reading the log: EOVERFLOW when its entries are gone) */
  failed(err: unknown): void;
}

export class Shipper {
  readonly #host: SiteHost;
  readonly #site: ShipperSite;
  /** every entry with seq ≤ watermark is shipped (ship) or marked (log) */
  #watermark = 0;
  /** last entry handed to the site or marked */
  #issued = 0;
  /** the current generation's entries in flight: seq → payload bytes */
  readonly #inflightSeqs = new Map<number, number>();
  #inflightBytes = 0;
  /** the site orders epochs itself (its device said so at the last ship): the pipelined window */
  #pipelined = false;
  /** ships in flight of any generation (a new loop starts only when none is) */
  #allInflight = 0;
  #gen = 0;
  /** the devices told of the current generation's start (`RemoteDevice.restart`) */
  readonly #restarted = new Set<object>();
  #restartedGen = 0;
  #loop: Promise<void> | null = null;
  #wake: (() => void) | null = null;
  #slot: (() => void) | null = null;
  #settledWaiters: Array<() => void> = [];
  #syncWaiters: Array<{ seq: number; resolve: () => void }> = [];
  #posWaiters: Array<{ seq: number; resolve: () => void; reject: (err: Error) => void }> = [];
  /** sectors shipped or marked since start (outstanding = appended − this) */
  #doneSectors = 0;
  /** ships in flight per device (any generation), and who waits for a device's to settle */
  readonly #inflightOf = new Map<number, number>();
  #devWaiters: Array<{ devNr: number; resolve: () => void }> = [];
  /** per device that left the group: its entries up to this seq are in its dirty logs, or forgotten (skipped) */
  readonly #skip = new Map<number, number>();

  constructor(host: SiteHost, site: ShipperSite) {
    this.#host = host;
    this.#site = site;
  }

  get watermark(): number {
    return this.#watermark;
  }
  /**
   * The site moves it (in sync from the head on, or the entries it needs are gone): those
   * waiting for a position up to it are released, and the entries skipped count as done.
   */
  set watermark(seq: number) {
    const forward = seq > this.#watermark;
    this.#watermark = seq;
    if (seq >= this.#host.head) this.#doneSectors = Math.max(this.#doneSectors, this.#host.appendedSectors);
    if (forward) this.#releaseWaiters();
  }
  /**
   * The oldest entry a ship of this site may still be reading (Infinity when none is in
   * flight): the log may reuse the memory of entries below it (Replog.reclaim). A new loop
   * starts only once every ship of the one before has settled, so the ships in flight are
   * all of one loop, and `#inflightSeqs` holds each of them (and, after a cancel, perhaps
   * some that settled since: older, so the answer only errs on the safe side).
   */
  get oldestHeld(): number {
    if (this.#allInflight === 0) return Infinity;
    const first = this.#inflightSeqs.keys().next();
    return first.done ? 0 : first.value;
  }
  get doneSectors(): number {
    return this.#doneSectors;
  }
  /** the running loop, if any */
  get loop(): Promise<void> | null {
    return this.#loop;
  }

  /** the group recovered its log: the site starts from `seq` */
  init(seq: number, backlogSectors: number): void {
    this.#watermark = seq;
    this.#issued = seq;
    // the backlog kept in the ring counts as outstanding (appended sectors count only new appends)
    this.#doneSectors = -backlogSectors;
  }

  /** a device left the group: its entries up to `seq` are in its dirty logs (or were forgotten), skip them */
  skip(devNr: number, seq: number): void {
    this.#skip.set(devNr, seq);
    this.wake();
  }

  /** start a loop from the watermark, unless one runs or the site may not run one */
  run(): void {
    if (!this.#site.canRun() || this.#loop) return;
    const gen = ++this.#gen;
    const loop = (async () => {
      await this.settled();
      if (gen === this.#gen) await this.#process(gen);
    })().catch((err: unknown) => this.#failed(gen, err)).finally(() => {
      if (this.#loop === loop) this.#loop = null;
      if (gen !== this.#gen) this.run(); // a restart was asked for while this one ran
    });
    this.#loop = loop;
  }

  /** stop the loop and start a new one from the watermark (mode change, recovery) */
  restart(): void {
    this.cancel();
    if (!this.#loop) this.run();
  }

  /** end the loop's generation: it stops, and its ships in flight change nothing when they complete */
  cancel(): void {
    this.#gen++;
    this.wake();
  }

  async #process(gen: number): Promise<void> {
    const reader = this.#host.log.reader(this.#watermark + 1);
    this.#issued = this.#watermark;
    this.#inflightSeqs.clear();
    this.#inflightBytes = 0;
    let epoch = -1;
    /** the entry read and not yet shipped, marked or skipped (kept across a wait for the previous epoch) */
    let pending: ReplogEntry | null = null;
    while (gen === this.#gen) {
      if (this.#windowFull()) {
        await new Promise<void>((r) => (this.#slot = r));
        continue;
      }
      let e = pending;
      if (!e) {
        // a run of cached entries is taken in one turn (the writers get one turn each too)
        let next = reader.tryNext ? reader.tryNext() : undefined;
        if (next === undefined) next = await reader.next();
        if (gen !== this.#gen) return;
        if (!next) {
          await new Promise<void>((r) => (this.#wake = r));
          continue;
        }
        e = pending = next;
      }
      // an entry of a device that left the group (its dirty logs have it, or it was
      // forgotten) is skipped, even if its number is bound again (another device); a device
      // not bound (after a restart, until its replicator-dev is loaded) is waited for
      let b = this.#host.binding(e.devNr);
      while (!b && !this.#skipped(e) && gen === this.#gen) {
        await Promise.race([this.#host.whenBound(e.devNr), new Promise<void>((r) => (this.#wake = r))]);
        b = this.#host.binding(e.devNr);
      }
      if (gen !== this.#gen) return;
      if (!b || this.#skipped(e)) {
        pending = null;
        this.#issued = e.seq;
        this.#complete(e);
        continue;
      }
      if (this.#site.mode() === 'log') {
        pending = null;
        this.#site.mark(e, b);
        this.#issued = e.seq;
        this.#complete(e);
        continue;
      }
      // a new epoch waits for the previous one's acknowledgements, unless the site orders
      // epochs itself (tcp): then its entries go out at once, behind the previous ones. The
      // entry is looked at again after the wait (its device may have left meanwhile)
      const remote = b.remotes.get(this.#site.slink);
      if (remote) this.#pipelined = remote.dev.ordersEpochs === true;
      if (e.epoch !== epoch && this.#inflightSeqs.size > 0 && !this.#pipelined) {
        await this.#drainGen(gen);
        continue;
      }
      pending = null;
      epoch = e.epoch;
      this.#ship(gen, e, b);
    }
  }

  /** an entry of a device that left the group (Shipper.skip) */
  #skipped(e: ReplogEntry): boolean {
    return e.seq <= (this.#skip.get(e.devNr) ?? 0);
  }

  #ship(gen: number, e: ReplogEntry, b: DevBinding): void {
    this.#issued = e.seq;
    const remote = b.remotes.get(this.#site.slink);
    if (!remote) { // this device is not replicated to this site
      this.#complete(e);
      return;
    }
    if (remote.dev.restart) {
      if (this.#restartedGen !== gen) {
        this.#restartedGen = gen;
        this.#restarted.clear();
      }
      if (!this.#restarted.has(remote.dev)) {
        this.#restarted.add(remote.dev); // every earlier ship has settled (run): the site may forget a failed one
        remote.dev.restart(e.seq, gen);
      }
    }
    this.#inflightSeqs.set(e.seq, e.data.length);
    this.#inflightBytes += e.data.length;
    this.#allInflight++;
    this.#inflightOf.set(e.devNr, (this.#inflightOf.get(e.devNr) ?? 0) + 1);
    const bio: Bio = e.op === 'flush' ? FLUSH : { op: e.op, sector: e.sector, sectors: e.sectors, data: e.data, flags: e.fua ? FUA : NONE };
    remote.dev.submit(bio, e).then(
      () => {
        this.#settle(e.devNr);
        if (gen !== this.#gen) return;
        this.#landed(e);
        this.#site.stats.shippedIos++;
        this.#site.stats.shippedBytes += e.data.length;
        this.#complete(e);
        this.#wakeSlot();
      },
      (err: unknown) => {
        this.#settle(e.devNr);
        if (gen !== this.#gen) return;
        this.#landed(e);
        this.#site.down(err);
      },
    );
  }

  /** is the window of entries in flight full? */
  #windowFull(): boolean {
    const n = this.#inflightSeqs.size;
    return this.#pipelined ? n >= MAX_PIPELINED || this.#inflightBytes >= MAX_PIPELINED_BYTES : n >= MAX_INFLIGHT;
  }

  /** an entry of the current generation is answered (done or failed) */
  #landed(e: ReplogEntry): void {
    if (this.#inflightSeqs.delete(e.seq)) this.#inflightBytes -= e.data.length;
  }

  #complete(e: ReplogEntry): void {
    this.#doneSectors += e.sectors;
    // entries go in flight in log order, so the oldest one still in flight is the first key
    const oldest = this.#inflightSeqs.keys().next();
    const w = oldest.done ? this.#issued : Math.min(this.#issued, oldest.value - 1);
    if (w > this.#watermark) {
      this.#watermark = w;
      this.#releaseWaiters();
    }
    this.#site.completed();
  }

  #drainGen(gen: number): Promise<void> {
    return (async () => {
      while (this.#inflightSeqs.size > 0 && gen === this.#gen) await new Promise<void>((r) => (this.#slot = r));
    })();
  }

  #settle(devNr: number): void {
    const n = this.#inflightOf.get(devNr)! - 1;
    if (n > 0) this.#inflightOf.set(devNr, n);
    else {
      this.#inflightOf.delete(devNr);
      if (this.#devWaiters.length > 0) { // a device leaving (rare): no allocation on the shipping path otherwise
        const done = this.#devWaiters.filter((w) => w.devNr === devNr);
        this.#devWaiters = this.#devWaiters.filter((w) => w.devNr !== devNr);
        for (const w of done) w.resolve();
      }
    }
    if (--this.#allInflight === 0) {
      const w = this.#settledWaiters;
      this.#settledWaiters = [];
      for (const f of w) f();
    }
    this.#wakeSlot();
  }

  /** resolves once no ship of device `devNr` is in flight (a device leaving: its devices may then close) */
  settledDev(devNr: number): Promise<void> {
    if (!this.#inflightOf.has(devNr)) return Promise.resolve();
    return new Promise((resolve) => this.#devWaiters.push({ devNr, resolve }));
  }

  /** resolves once no ship of any generation is in flight */
  settled(): Promise<void> {
    if (this.#allInflight === 0) return Promise.resolve();
    return new Promise((r) => this.#settledWaiters.push(r));
  }

  /** a new entry, a device bound or left, or the generation ended: the loop looks again */
  wake(): void {
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
    this.#site.failed(err);
  }

  // ---- waiters on the watermark ----

  #releaseWaiters(): void {
    const w = this.#watermark;
    if (this.#syncWaiters.length) this.#syncWaiters = this.#syncWaiters.filter((x) => (x.seq <= w ? (x.resolve(), false) : true));
    if (this.#posWaiters.length) this.#posWaiters = this.#posWaiters.filter((x) => (x.seq <= w ? (x.resolve(), false) : true));
  }

  /** a writer of a synchronous site: resolves once the watermark reaches `seq`, or at `releaseSync` */
  waitShipped(seq: number): Promise<void> {
    return new Promise((resolve) => this.#syncWaiters.push({ seq, resolve }));
  }

  /** the site is no longer synchronous: every writer waiting for it goes */
  releaseSync(): void {
    const w = this.#syncWaiters;
    this.#syncWaiters = [];
    for (const x of w) x.resolve();
  }

  /** resolves once the watermark reaches `seq`; rejects at `failPositions` */
  waitPosition(seq: number): Promise<void> {
    return new Promise((resolve, reject) => this.#posWaiters.push({ seq, resolve, reject }));
  }

  /** the loop stopped in ship mode: nobody waits for a position it will not reach */
  failPositions(err: Error): void {
    const w = this.#posWaiters;
    this.#posWaiters = [];
    for (const x of w) x.reject(err);
  }
}

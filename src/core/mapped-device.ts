/**
 * A mapped device: live and inactive table slots, suspend/resume with queueing and drain,
 * the I/O contract checks and splitting (dm-table's role), events, open count.
 */
import { EventEmitter } from 'node:events';
import type { Bio } from './bio.ts';
import { EMPTY } from './bio.ts';
import { BlockError, DeviceError, toBlockError } from './errors.ts';
import type { Table, TableEntry } from './table.ts';
import type { BlockDev, EventDetail, Extent, Target } from './types.ts';
import { appendClipped, mergeExtents } from './extents.ts';
import { IoMeter, IoStats, OP_INDEX, type IoStatsSnapshot } from './io-stats.ts';

interface Queued {
  bio: Bio;
  /** submitted by the replication receiver of a secondary device: the secondary term of its way in (null: not) */
  receiver: number | null;
  resolve: () => void;
  reject: (err: unknown) => void;
}

export type DeviceState = 'active' | 'suspended';

/** who holds a device open (MappedDevice.open): a text, or a function giving the text now */
export type OpenHolder = string | (() => string);

/**
 * I/O that reaches a device's files without going through `submit`: the NBD connection
 * threads read and write a `linear`-over-file device's file themselves (docs/nbd.md). The
 * device stops it at suspend, as it drains its own I/O, and starts it again at resume with
 * the table that is then live; removal stops it for good.
 */
export interface Bypass {
  /** start no more such I/O; resolve once none is in flight */
  stop(): Promise<void>;
  /** the device runs again with `live` as its table */
  start(live: Table): void;
}

export class MappedDevice extends EventEmitter implements BlockDev {
  name: string;
  uuid: string;
  readOnly: boolean;
  /** engine-local device number (shown where dmsetup shows major:minor) */
  readonly minor: number;
  #live: Table | null = null;
  #inactive: Table | null = null;
  #suspended = false;
  #queue: Queued[] = [];
  #inflight = 0;
  #drainWaiters: Array<() => void> = [];
  #eventNr = 0;
  #lastEvent: { text: string; detail?: EventDetail } = { text: '' };
  /** one entry per open: who holds it (OpenHolder), or null for an opener that did not say */
  readonly #openers: Array<OpenHolder | null> = [];
  #deferredRemove = false;
  #removed = false;
  readonly #bypasses = new Set<Bypass>();
  /** who this device receives replication from while it is secondary (null: primary) */
  #secondary: string | null = null;
  /**
   * Counts the device's changes of role: a receiver's way in (setSecondary) writes only while
   * the term it was given is the current one, so that once the device is promoted (or handed to
   * another stream) a write of the old stream still in flight or queued fails with EROFS.
   */
  #term = 0;
  /** I/O statistics (src/core/io-stats.ts): the device's, kept across reloads and renames */
  readonly #io = new IoStats();
  /** times dispatched bios into the main thread's slab; its completions also end them in flight */
  readonly #meter = new IoMeter(this.#io.main, () => {
    if (--this.#inflight === 0 && this.#drainWaiters.length) this.#wakeDrain();
  }, toBlockError);

  constructor(name: string, minor: number, opts: { uuid?: string; readOnly?: boolean } = {}) {
    super();
    this.name = name;
    this.minor = minor;
    this.uuid = opts.uuid ?? '';
    this.readOnly = !!opts.readOnly;
  }

  get ref(): string {
    return `dm:${this.name}`;
  }
  get sectors(): number {
    return this.#live?.sectors ?? 0;
  }
  get live(): Table | null {
    return this.#live;
  }
  get inactive(): Table | null {
    return this.#inactive;
  }
  get suspended(): boolean {
    return this.#suspended;
  }
  get eventNr(): number {
    return this.#eventNr;
  }
  /** what the last event said (its text and detail) */
  get lastEvent(): { text: string; detail?: EventDetail } {
    return this.#lastEvent;
  }
  get openCount(): number {
    return this.#openers.length;
  }
  /**
   * The open count with who holds the device, for `device is busy (open count …)`: `1`
   * when no opener said who it is, `1: used by dm:top`, `2: used by dm:top, and 1 other opener`
   * (each holder's text once, however many times it holds it).
   */
  describeOpeners(): string {
    const held = this.#openers.filter((h): h is OpenHolder => h !== null);
    const named = [...new Set(held.map((h) => (typeof h === 'function' ? h() : h)))]; // a holder that opened twice (a reload) once
    const others = this.#openers.length - held.length;
    if (named.length === 0) return String(this.#openers.length);
    return `${this.#openers.length}: ${named.join(', ')}${others ? `, and ${others} other opener${others === 1 ? '' : 's'}` : ''}`;
  }
  get inflight(): number {
    return this.#inflight;
  }
  /** the live table's target instance covering `sector` (a replicator-dev finds its replicator this way) */
  liveTarget(sector: number): Target | null {
    const t = this.#live;
    if (!t || sector < 0 || sector >= t.sectors) return null;
    return t.entries[t.find(sector)]!.target;
  }
  get deferredRemove(): boolean {
    return this.#deferredRemove;
  }
  get removed(): boolean {
    return this.#removed;
  }

  /** who the device receives replication from while it is secondary; null when it is primary */
  get secondary(): string | null {
    return this.#secondary;
  }

  /**
   * Make the device secondary: from now on its writes fail with EROFS for every opener
   * (library, NBD clients, tables above it), except through the returned device, which is
   * the replication receiver's way in. NBD connection threads that write its files
   * directly are stopped and restarted read-only first. `owner` names the sender for
   * messages. Throws EBUSY when it is already secondary for someone else.
   */
  async setSecondary(owner: string): Promise<BlockDev> {
    if (this.#secondary !== null && this.#secondary !== owner) {
      throw new DeviceError('EBUSY', `${this.name}: already secondary, receiving from ${this.#secondary}`);
    }
    if (this.#secondary === null) {
      this.#secondary = owner;
      this.#term++;
      await this.#restartBypasses();
      this.event(`secondary: receives replication from ${owner}; writes refused`, { role: 'secondary', from: owner });
    }
    const self = this; // eslint-disable-line @typescript-eslint/no-this-alias
    const term = this.#term;
    return { ref: this.ref, get sectors() { return self.sectors; }, submit: (bio: Bio) => this.#submit(bio, term) };
  }

  /** Writable again for every opener (the sender stopped replicating to it). */
  async clearSecondary(): Promise<void> {
    if (this.#secondary === null) return;
    this.#secondary = null;
    this.#term++; // the receiver's way in writes no more
    await this.#restartBypasses();
    this.event('primary: writable again', { role: 'primary' });
  }

  async #restartBypasses(): Promise<void> {
    if (this.#suspended || !this.#live) return; // they restart at resume, seeing the new role
    const live = this.#live;
    await Promise.all([...this.#bypasses].map((b) => b.stop()));
    for (const b of this.#bypasses) b.start(live);
  }

  /** Submit a bio (device-relative sectors). Checks the contract, queues while suspended. */
  submit(bio: Bio): Promise<void> {
    return this.#submit(bio, null);
  }

  #submit(bio: Bio, receiver: number | null): Promise<void> {
    const bad = this.#check(bio, receiver);
    if (bad) return this.#refuse(bio, bad);
    if (this.#suspended || !this.#live) {
      return new Promise((resolve, reject) => this.#queue.push({ bio, receiver, resolve, reject }));
    }
    return this.#dispatch(this.#live, bio);
  }

  #check(bio: Bio, receiver: number | null): BlockError | null {
    if (this.#removed) return new BlockError('ENXIO', `${this.name}: device removed`);
    const { op, sector, sectors } = bio;
    if (op === 'flush') return null;
    if (!Number.isSafeInteger(sector) || !Number.isSafeInteger(sectors) || sector < 0 || sectors <= 0) {
      return new BlockError('EINVAL', `${this.name}: invalid ${op} at sector ${sector} (+${sectors})`);
    }
    if ((op === 'read' || op === 'write') && bio.data.length !== sectors * 512) {
      return new BlockError('EINVAL', `${this.name}: ${op} buffer of ${bio.data.length} bytes for ${sectors} sectors`);
    }
    if (op !== 'read' && this.readOnly) return new BlockError('EROFS', `${this.name}: device is read-only`);
    if (op !== 'read' && receiver !== null && (receiver !== this.#term || this.#secondary === null)) {
      return new BlockError('EROFS', `${this.name}: a write of a replication stream the device no longer receives (it was promoted, or another stream took it): refused`);
    }
    if (op !== 'read' && this.#secondary !== null && receiver === null) {
      return new BlockError('EROFS', `${this.name}: device is secondary (it receives replication from ${this.#secondary}); writes are refused until it is promoted`);
    }
    const size = this.#live && !this.#suspended ? this.#live.sectors : Infinity;
    if (sector + sectors > size) {
      return new BlockError(op === 'read' ? 'EINVAL' : 'ENOSPC',
        `${this.name}: ${op} of sectors ${sector}+${sectors} is beyond the device end (${size} sectors)`);
    }
    return null;
  }

  #dispatch(table: Table, bio: Bio): Promise<void> {
    if (bio.sector + bio.sectors > table.sectors && bio.op !== 'flush') {
      return this.#refuse(bio, new BlockError(bio.op === 'read' ? 'EINVAL' : 'ENOSPC',
        `${this.name}: ${bio.op} of sectors ${bio.sector}+${bio.sectors} is beyond the device end (${table.sectors} sectors)`));
    }
    this.#inflight++;
    // an op outside IO_OPS has no index: its cells are NaN, which a Float64Array ignores
    const timed = this.#meter.start(OP_INDEX[bio.op], bio.op === 'flush' ? 0 : bio.sectors * 512);
    let p: Promise<void>;
    if (bio.flags.preflush && bio.op !== 'flush') {
      const rest: Bio = { op: bio.op, sector: bio.sector, sectors: bio.sectors, data: bio.data, flags: { fua: bio.flags.fua, noUnmap: bio.flags.noUnmap } };
      p = table.flushTargets.length ? flushTable(table).then(() => route(table, rest)) : route(table, rest);
    } else {
      p = route(table, bio);
    }
    return p.then(timed.ok, timed.fail);
  }

  /** a bio refused before dispatch: a failure in the statistics (io-stats.ts) */
  #refuse(bio: Bio, err: BlockError): Promise<void> {
    this.#meter.refused(OP_INDEX[bio.op]);
    return Promise.reject(err);
  }

  /** I/O statistics since the device was created: its own bios and its connection threads' file I/O */
  ioStats(): IoStatsSnapshot {
    return this.#io.snapshot();
  }

  /**
   * The statistics slab in which NBD connection thread `writer` (≥ 1, io-stats.ts
   * claimWriter) counts the file I/O it does for this device without `submit`.
   */
  ioSlab(writer: number): Float64Array {
    return this.#io.slab(writer);
  }

  /**
   * Allocation map of [sector, sector+sectors) across the live table. Stops after a target
   * that answers for only part of its share (the caller asks again from there, as an NBD
   * client does with a short BLOCK_STATUS reply); an empty answer counts as data.
   */
  async allocation(sector: number, sectors: number): Promise<Extent[]> {
    const table = this.#live;
    if (!table) return [{ sectors, state: 'data' }];
    const out: Extent[] = [];
    let s = sector;
    const end = Math.min(sector + sectors, table.sectors);
    while (s < end) {
      const e = table.entries[table.find(s)]!;
      const n = Math.min(end, e.end) - s;
      const part = e.target.allocation ? await e.target.allocation(s - e.begin, n) : [{ sectors: n, state: 'data' as const }];
      const covered = appendClipped(out, part, n);
      if (covered === 0) out.push({ sectors: n, state: 'data' });
      else if (covered < n) break;
      s += n;
    }
    return mergeExtents(out);
  }

  // ---- table slots and suspend/resume (driven by the device manager) ----

  setInactive(table: Table | null): Table | null {
    const old = this.#inactive;
    this.#inactive = table;
    return old;
  }

  async suspend(): Promise<void> {
    if (this.#suspended) return;
    const table = this.#live;
    if (table) for (const e of table.entries) await e.target.presuspend?.();
    this.#suspended = true;
    const stopped = [...this.#bypasses].map((b) => b.stop());
    await this.drain();
    await Promise.all(stopped);
    if (table) for (const e of table.entries) await e.target.postsuspend?.();
  }

  /** Wait until no bio is in flight. */
  drain(): Promise<void> {
    if (this.#inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#drainWaiters.push(resolve));
  }

  #wakeDrain(): void {
    const w = this.#drainWaiters;
    this.#drainWaiters = [];
    for (const f of w) f();
  }

  /**
   * Swap in the inactive table if one is loaded (returning the old live table for the
   * caller to destroy), run resume hooks, re-issue queued I/O. A failing hook leaves the
   * device suspended.
   */
  async resume(): Promise<Table | null> {
    let old: Table | null = null;
    if (this.#inactive) {
      if (!this.#suspended) await this.suspend();
      old = this.#live;
      this.#live = this.#inactive;
      this.#inactive = null;
      this.readOnly = this.#live.readOnly;
    }
    if (this.#live) for (const e of this.#live.entries) await e.target.resume?.();
    // bypasses were stopped only if the device was suspended (a table swap suspends first):
    // resuming a running device must not restart I/O that is still going on
    const restart = this.#suspended;
    this.#suspended = false;
    if (this.#live) {
      if (restart) for (const b of this.#bypasses) b.start(this.#live);
      this.#reissue();
    }
    return old;
  }

  #reissue(): void {
    const q = this.#queue;
    this.#queue = [];
    for (const { bio, receiver, resolve, reject } of q) this.#submit(bio, receiver).then(resolve, reject);
  }

  /** register I/O that bypasses submit (it must already be stopped if the device is suspended) */
  addBypass(b: Bypass): void {
    if (this.#removed) throw new DeviceError('ENXIO', `${this.name}: device removed`);
    this.#bypasses.add(b);
  }

  deleteBypass(b: Bypass): void {
    this.#bypasses.delete(b);
  }

  get queued(): number {
    return this.#queue.length;
  }

  /** Raise an event: bump the counter, keep what it says, wake waiters ('event': number, text, detail). */
  event(what = '', detail?: EventDetail): void {
    this.#eventNr++;
    this.#lastEvent = detail ? { text: what, detail } : { text: what };
    this.emit('event', this.#eventNr, what, detail);
  }

  /** Resolve with the new event number once it differs from `nr`. */
  wait(nr: number, signal?: AbortSignal): Promise<number> {
    if (this.#eventNr !== nr) return Promise.resolve(this.#eventNr);
    if (this.#removed) return Promise.reject(new DeviceError('ENXIO', `${this.name}: device removed`));
    return new Promise((resolve, reject) => {
      const onEvent = (n: number): void => { cleanup(); resolve(n); };
      const onRemoved = (): void => { cleanup(); reject(new DeviceError('ENXIO', `${this.name}: device removed`)); };
      const onAbort = (): void => { cleanup(); reject(new DeviceError('EINTR', 'wait aborted')); };
      const cleanup = (): void => {
        this.off('event', onEvent);
        this.off('removed', onRemoved);
        signal?.removeEventListener('abort', onAbort);
      };
      this.on('event', onEvent);
      this.on('removed', onRemoved);
      signal?.addEventListener('abort', onAbort);
    });
  }

  /**
   * Add an opener. `holder` says who it is, for the busy message (`used by dm:top`,
   * `receiving replication stream of group 'repl'; …`): a text, or a function giving it
   * when asked (a name that may change); the same value (===) closes it again.
   */
  open(holder?: OpenHolder): void {
    if (this.#removed) throw new DeviceError('ENXIO', `${this.name}: device removed`);
    this.#openers.push(holder ?? null);
  }

  /**
   * Drop one opener: the one opened with `holder` (===), else one that did not say who it
   * is, else the latest; returns true when a deferred remove is now due.
   */
  close(holder?: OpenHolder): boolean {
    let i = this.#openers.lastIndexOf(holder ?? null);
    if (i < 0) i = this.#openers.lastIndexOf(null);
    if (i < 0) i = this.#openers.length - 1;
    if (i >= 0) this.#openers.splice(i, 1);
    return this.#openers.length === 0 && this.#deferredRemove;
  }

  markDeferredRemove(): void {
    this.#deferredRemove = true;
  }

  /** final teardown: fail queued I/O, wake waiters, hand back the tables to destroy */
  markRemoved(): Table[] {
    this.#removed = true;
    for (const b of this.#bypasses) void b.stop();
    this.#bypasses.clear();
    const q = this.#queue;
    this.#queue = [];
    for (const { reject } of q) reject(new BlockError('ENXIO', `${this.name}: device removed`));
    this.emit('removed');
    const tables = [this.#live, this.#inactive].filter((t): t is Table => t !== null);
    this.#live = null;
    this.#inactive = null;
    return tables;
  }
}

/**
 * Send a flush to every target of a table that takes flushes (dm's per-target
 * `num_flush_bios`): `error` and `zero` lines get none, so a table of only such lines
 * flushes at once and successfully, as in the kernel.
 */
export function flushTable(table: Table): Promise<void> {
  const targets = table.flushTargets;
  if (targets.length === 0) return Promise.resolve();
  const flush: Bio = { op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} };
  if (targets.length === 1) return targets[0]!.map(flush);
  return settleAll(targets.map((t) => t.map(flush)));
}

/**
 * Wait for every part of a split bio, then fail with the first error if any. (Promise.all
 * would complete the bio at the first failure while its other parts are still in flight,
 * so a drain or the caller could see them land afterwards.)
 */
export function settleAll(parts: Promise<void>[]): Promise<void> {
  return Promise.allSettled(parts).then((results) => {
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  });
}

/** Route a device-relative bio to the targets covering it, splitting without copying. */
function route(table: Table, bio: Bio): Promise<void> {
  if (bio.op === 'flush') return flushTable(table);
  const entries = table.entries;
  let i = table.find(bio.sector);
  let e = entries[i]!;
  const end = bio.sector + bio.sectors;
  const rel = bio.sector - e.begin;
  if (end <= e.end && (e.maxIo === 0 || Math.floor(rel / e.maxIo) === Math.floor((rel + bio.sectors - 1) / e.maxIo))) {
    return e.target.map({ op: bio.op, sector: rel, sectors: bio.sectors, data: bio.data, flags: bio.flags });
  }
  const parts: Promise<void>[] = [];
  const hasData = bio.op === 'read' || bio.op === 'write';
  let s = bio.sector;
  while (s < end) {
    while (s >= e.end) e = entries[++i]!;
    const r = s - e.begin;
    let n = Math.min(end, e.end) - s;
    if (e.maxIo) n = Math.min(n, e.maxIo - (r % e.maxIo));
    const data = hasData ? bio.data.subarray((s - bio.sector) * 512, (s - bio.sector + n) * 512) : EMPTY;
    parts.push(entryMap(e, { op: bio.op, sector: r, sectors: n, data, flags: bio.flags }));
    s += n;
  }
  return settleAll(parts);
}

function entryMap(e: TableEntry, bio: Bio): Promise<void> {
  return e.target.map(bio);
}

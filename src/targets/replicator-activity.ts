/**
 * The replicator's activity log, after DRBD's: the extents (4 MiB of one device) that may
 * hold writes not yet durable on the local devices or in the replication log.
 *
 * Checkpoints need not flush the local devices or the log (replicator-group.ts, #checkpoint),
 * so after a power loss a local device may lack writes a site has, or hold writes whose
 * entries the log lost. Without this log every site is then verified whole. With it, only the
 * extents the last durable checkpoint holds are (docs/targets/replicator.md, "Power loss"):
 *
 *  - a write to an extent not held waits until a checkpoint that holds it is durable (one
 *    slot write, shared by every write that missed meanwhile), so the checkpoint always
 *    names every extent a write has gone to since the last full flush;
 *  - an extent leaves (least recently written first, only to make room) once no write to it
 *    is in flight and a flush of the local devices and the log has covered its last entry;
 *    such a flush runs when the log is three quarters full, and at once when a write finds
 *    no room;
 *  - when every extent is busy (in flight, or pinned below), a write goes on outside them and
 *    the checkpoint says the log is incomplete (a power loss then verifies everything) until a
 *    flush covers it;
 *  - the extents recovered at a restart are pinned (they stay, named by every checkpoint)
 *    until the group says so: after a power loss the sites are verified against them, and
 *    a device not loaded again has not been flushed since; a device that leaves the group
 *    keeps its extents until the next restart (its last writes are not flushed by later
 *    flushes, which flush only the devices bound).
 *
 * The hot path (every extent held and durable) counts and allocates nothing but two numbers
 * per extent.
 */
import { CHECKPOINT_MAX_ACTIVE } from '../replog/types.ts';

/** sectors per extent: 4 MiB, as DRBD's */
export const EXTENT_SECTORS = 8192;
/** the extent index that stands for itself and every later one of its device (keys are 24 bits of extent) */
export const LAST_EXTENT = 0xffffff;
const DEV_FACTOR = 2 ** 24;
/** extents held ahead of a sequential stream (64 MiB), refilled when half of them are behind it */
const AHEAD = 16;
/** the most extents a checkpoint holds, and the default */
export const MAX_EXTENTS = CHECKPOINT_MAX_ACTIVE;

/** the key of device `devNr`'s extent holding `sector` */
export function extentKey(devNr: number, sector: number): number {
  return devNr * DEV_FACTOR + Math.min(Math.floor(sector / EXTENT_SECTORS), LAST_EXTENT);
}

/** device number and extent index of a key */
export function extentOf(key: number): { devNr: number; extent: number } {
  return { devNr: Math.floor(key / DEV_FACTOR), extent: key % DEV_FACTOR };
}

/** the extents of `keys` by device number */
export function extentsByDevice(keys: readonly number[]): Map<number, number[]> {
  const out = new Map<number, number[]>();
  for (const k of keys) {
    const { devNr, extent } = extentOf(k);
    const list = out.get(devNr);
    if (list) list.push(extent);
    else out.set(devNr, [extent]);
  }
  return out;
}

/** What the activity log needs from its group. */
export interface ActivityHost {
  /**
   * Write a checkpoint holding `snapshot()` as of the call (taken synchronously), then call
   * `persisted` with its version; resolves once durable. Rejects when the write failed.
   */
  persist(): Promise<void>;
  /**
   * Flush the local devices and the log. Resolves with a seq such that every entry up to
   * it had been appended and written to its local device before the flush began.
   */
  flushAll(): Promise<number>;
  /** the seq `flushAll` would resolve with if called now (every entry up to it written locally) */
  done(): number;
}

interface Extent {
  /** the last entry written to it (or the head when it was recovered) */
  last: number;
  /** writes admitted and not over */
  inflight: number;
  /** when it was last written (for the least recently written) */
  tick: number;
  /** the snapshot version that first holds it: writes wait until one that recent is durable */
  version: number;
  /** 0: may go; PIN_RESTORED: recovered, until `unpin`; PIN_LEFT: of a device that left, until a restart */
  pin: number;
}

const PIN_RESTORED = 1;
const PIN_LEFT = 2;

/** writes admitted outside the extents (none had room) */
interface Outside {
  last: number;
  inflight: number;
  version: number;
}

export interface ActivitySnapshot {
  readonly extents: number[];
  readonly incomplete: boolean;
  readonly version: number;
}

export class ActivityLog {
  /** extents held at most (pinned ones add to it, up to MAX_EXTENTS); 0: no activity log is kept */
  readonly capacity: number;
  readonly #host: ActivityHost;
  readonly #extents = new Map<number, Extent>();
  #tick = 0;
  /** bumped whenever something is added that a write must see durable */
  #version = 0;
  /** the version of the newest durable checkpoint */
  #durable = 0;
  /** every entry up to it is durable on the local devices and in the log */
  #flushed = 0;
  #pinned = 0;
  /** the log's head when the extents were recovered */
  #restoredHead = 0;
  #outside: Outside | null = null;
  /** the extent a sequential stream could not have held ahead, and #flushed then (not tried again until one changes) */
  #aheadFailed = -1;
  #aheadFailedAt = -1;
  #writing: Promise<void> | null = null;
  #flushing: Promise<void> | null = null;
  /** per device, where its last write ended (-1: none): a write that starts there is sequential */
  readonly #streamEnd = new Float64Array(256).fill(-1);
  /** writes that found an extent not held (each waited for a checkpoint), full flushes run for room, writes outside, extents held ahead of a sequential stream */
  readonly stats = { misses: 0, flushes: 0, outside: 0, prefetched: 0 };

  constructor(host: ActivityHost, capacity: number) {
    this.#host = host;
    this.capacity = capacity;
  }

  /** extents held now */
  get size(): number {
    return this.#extents.size;
  }

  /** the most extents held before one must leave */
  #limit(): number {
    return Math.min(MAX_EXTENTS, this.#pinned + this.capacity);
  }

  /**
   * A write of `sectors` at `sector` of device `devNr` is about to be logged: true at once
   * when its extents are held (durably), else a promise of true (held now) or false (outside
   * them: see the file's comment). Rejects when the checkpoint holding them failed (nothing
   * is then counted). Each call is ended by exactly one `leave` with the same answer.
   */
  enter(devNr: number, sector: number, sectors: number): true | Promise<boolean> {
    const first = extentKey(devNr, sector);
    const last = extentKey(devNr, sector + Math.max(sectors, 1) - 1);
    // a sequential stream gets the extent after this one held before it gets there, so that
    // it does not wait for a checkpoint every 4 MiB (random writes do not: no extra extents)
    const stream = this.#streamEnd[devNr] === sector;
    this.#streamEnd[devNr] = sector + sectors;
    for (let k = first; k <= last; k++) {
      const e = this.#extents.get(k);
      if (e === undefined || e.version > this.#durable) return this.#enterSlow(first, last, stream);
    }
    const tick = ++this.#tick;
    for (let k = first; k <= last; k++) {
      const e = this.#extents.get(k)!;
      e.inflight++;
      e.tick = tick;
    }
    if (stream) this.#ahead(last);
    return true;
  }

  /** the write `enter` admitted is over: `seq` its entry (the head when it failed), `held` what enter answered */
  leave(devNr: number, sector: number, sectors: number, seq: number, held: boolean): void {
    if (!held) {
      const o = this.#outside!;
      o.inflight--;
      if (seq > o.last) o.last = seq;
      // the last write outside is over and there is room again: a flush ends the incomplete
      // state (no later miss may run one). Without room (all pinned, say) it stays, at no cost
      if (o.inflight === 0 && o.last > this.#flushed && !this.#flushing && (this.#extents.size < this.#limit() || this.#mayGo(1, this.#host.done()) > 0)) void this.#flushSoon();
      return;
    }
    const first = extentKey(devNr, sector);
    const last = extentKey(devNr, sector + Math.max(sectors, 1) - 1);
    for (let k = first; k <= last; k++) {
      const e = this.#extents.get(k)!;
      e.inflight--;
      if (seq > e.last) e.last = seq;
    }
  }

  /**
   * Hold the AHEAD extents after `key` ahead of a sequential stream, where there is room
   * without a flush, once fewer than half of them are; their checkpoint is written in the
   * background, one for all of them. (Measured, tools/bench/seq-activity.ts: one extent ahead
   * was not enough, as 8 writes of 1 MiB in flight span two extents and a slot write waits
   * behind the disk's writeback; and a slot write per extent slowed the stream)
   */
  #ahead(key: number): void {
    const dev = key - (key % DEV_FACTOR);
    const end = Math.min(key + AHEAD, dev + LAST_EXTENT);
    if (end <= key || this.#extents.has(Math.min(key + AHEAD / 2, end))) return; // (held ahead enough already)
    if (end === this.#aheadFailed && this.#flushed === this.#aheadFailedAt) return;
    let version = 0;
    for (let k = key + 1; k <= end; k++) {
      if (this.#extents.has(k)) continue;
      if (this.#extents.size >= this.#limit() && !this.#evictOne()) {
        this.#aheadFailed = end;
        this.#aheadFailedAt = this.#flushed;
        break;
      }
      version = ++this.#version;
      this.#extents.set(k, { last: 0, inflight: 0, tick: ++this.#tick, version, pin: 0 });
      this.stats.prefetched++;
    }
    if (version > 0) this.#durableAt(version).catch(() => undefined); // (a write to one waits for, or retries, the checkpoint)
  }

  async #enterSlow(first: number, last: number, stream: boolean): Promise<boolean> {
    this.stats.misses++;
    for (let round = 0; ; round++) {
      if (this.#take(first, last)) {
        if (stream) this.#ahead(last);
        let version = 0;
        for (let k = first; k <= last; k++) version = Math.max(version, this.#extents.get(k)!.version);
        try {
          await this.#durableAt(version);
        } catch (err) {
          for (let k = first; k <= last; k++) this.#extents.get(k)!.inflight--;
          throw err;
        }
        return true;
      }
      // no room: a flush lets go the extents it would cover. When none would go (every one
      // busy, pinned, or past what the local devices have done, as while a replay waits), or
      // a flush begun after the miss made no room, the write goes outside them at once
      if (round > 0 || this.#mayGo(1, this.#host.done()) === 0) return this.#enterOutside();
      await this.#flushAfterNow();
    }
  }

  async #enterOutside(): Promise<boolean> {
    this.stats.outside++;
    const o = (this.#outside ??= { last: 0, inflight: 0, version: 0 });
    if (o.inflight === 0 && o.last <= this.#flushed) o.version = ++this.#version; // (again) not known to the checkpoints
    o.inflight++;
    try {
      await this.#durableAt(o.version);
    } catch (err) {
      o.inflight--;
      throw err;
    }
    return false;
  }

  /**
   * Hold extents first … last for one more write (each counted in flight, so none of them
   * goes to make room for the next), letting cold ones go for room; false, with nothing
   * counted, when there is no room
   */
  #take(first: number, last: number): boolean {
    const tick = ++this.#tick;
    let added = 0; // bit i: extent first + i was added here (a write spans at most a few)
    for (let k = first; k <= last; k++) {
      let e = this.#extents.get(k);
      if (e === undefined) {
        while (this.#extents.size >= this.#limit()) {
          if (this.#evictOne()) continue;
          for (let j = first; j < k; j++) {
            if (added & (1 << (j - first))) this.#extents.delete(j); // (nothing was written to it)
            else this.#extents.get(j)!.inflight--;
          }
          return false;
        }
        e = { last: 0, inflight: 0, tick, version: ++this.#version, pin: 0 };
        this.#extents.set(k, e);
        added |= 1 << (k - first);
      }
      e.inflight++;
      e.tick = tick;
    }
    // the extents not pinned three quarters of their room, with few that may go: a flush now,
    // so that later misses find room
    const room = this.#limit() - this.#pinned;
    const quarter = room >> 2;
    if (!this.#flushing && (this.#extents.size - this.#pinned) * 4 >= room * 3 && this.#mayGo(quarter, this.#flushed) < quarter) void this.#flushSoon();
    return true;
  }

  /** how many extents not pinned, with nothing in flight, had their last write by `seq` (may go after a flush that covers it), counted up to `enough` */
  #mayGo(enough: number, seq: number): number {
    let n = 0;
    for (const e of this.#extents.values()) {
      if (e.pin === 0 && e.inflight === 0 && e.last <= seq && ++n >= enough) break;
    }
    return n;
  }

  /** let the least recently written extent that may go go; false when none may */
  #evictOne(): boolean {
    let victim = -1;
    let tick = Infinity;
    for (const [k, e] of this.#extents) {
      if (e.pin !== 0 || e.inflight > 0 || e.last > this.#flushed || e.tick >= tick) continue;
      victim = k;
      tick = e.tick;
    }
    if (victim < 0) return false;
    this.#extents.delete(victim);
    return true;
  }

  /** wait until a checkpoint of at least `version` is durable (one write serves every waiter) */
  async #durableAt(version: number): Promise<void> {
    while (this.#durable < version) {
      this.#writing ??= this.#host.persist().finally(() => (this.#writing = null));
      await this.#writing;
    }
  }

  /** a flush that begins after this call (so it covers every write over by now) */
  async #flushAfterNow(): Promise<void> {
    if (this.#flushing) await this.#flushing.catch(() => undefined);
    await this.#flushSoon();
  }

  /** a full flush, or the one running */
  #flushSoon(): Promise<void> {
    this.#flushing ??= (async () => {
      this.stats.flushes++;
      try {
        this.flushed(await this.#host.flushAll());
      } finally {
        this.#flushing = null;
      }
    })();
    return this.#flushing.catch(() => undefined);
  }

  /** every entry up to `seq` is durable on the local devices and in the log (a full flush, or a quiesced checkpoint) */
  flushed(seq: number): void {
    if (seq > this.#flushed) this.#flushed = seq;
  }

  /** what a checkpoint keeps now; `incomplete`: say so whatever the extents are (a whole verification pending) */
  snapshot(incomplete = false): ActivitySnapshot {
    const o = this.#outside;
    if (o && o.inflight === 0 && o.last <= this.#flushed) this.#outside = null;
    return { extents: [...this.#extents.keys()], incomplete: incomplete || this.#outside !== null, version: this.#version };
  }

  /** a checkpoint holding the snapshot of `version` is durable */
  persisted(version: number): void {
    if (version > this.#durable) this.#durable = version;
  }

  /**
   * The extents a recovered checkpoint held (`keys`; null when it kept none, or was
   * incomplete: then every write of the last run may be unflushed, and checkpoints say
   * incomplete) with the log's head: pinned until `unpin`, then they stay until a flush
   * covers the head.
   */
  restore(keys: readonly number[] | null, head: number): void {
    this.#restoredHead = head;
    if (keys === null) this.#outside = { last: Infinity, inflight: 0, version: 0 };
    for (const k of keys ?? []) {
      if (this.#extents.has(k)) continue;
      this.#extents.set(k, { last: head, inflight: 0, tick: 0, version: 0, pin: PIN_RESTORED });
      this.#pinned++;
    }
  }

  /** what the extents recovered were pinned for is over (the sites verified, every device flushed since) */
  unpin(): void {
    if (this.#outside?.last === Infinity) this.#outside.last = this.#restoredHead;
    for (const e of this.#extents.values()) {
      if (e.pin !== PIN_RESTORED) continue;
      e.pin = 0;
      this.#pinned--;
    }
  }

  /** are extents recovered still pinned? */
  get restoredPinned(): boolean {
    if (this.#outside?.last === Infinity) return true;
    for (const e of this.#extents.values()) if (e.pin === PIN_RESTORED) return true;
    return false;
  }

  /** device `devNr` leaves the group: its extents stay until a restart */
  keepDevice(devNr: number): void {
    const from = devNr * DEV_FACTOR;
    for (const [k, e] of this.#extents) {
      if (k < from || k >= from + DEV_FACTOR || e.pin === PIN_LEFT) continue;
      if (e.pin === 0) this.#pinned++;
      e.pin = PIN_LEFT;
    }
  }

  get pinned(): number {
    return this.#pinned;
  }
}

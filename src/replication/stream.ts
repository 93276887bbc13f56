/**
 * One replication stream at the receiver: the entries of one sender's log (its uuid) over
 * one slink, applied to the receiver's devices in the group's order.
 *
 * - An entry with seq ≤ the persisted applied position was applied before (a re-send after
 *   a reconnect or a crash of either side): it is acknowledged and not applied again.
 * - Epochs are applied one after the other: an entry of a later epoch waits until every
 *   entry of the current one is done; entries of one epoch are applied concurrently.
 * - The sender sends entries in log order and the next epoch's without waiting for the
 *   previous one's acknowledgements (pipelined); the session submits them in the order it
 *   reads them, holding back what follows a frame it asked for again (RESEND), so the
 *   entries submitted are always a prefix of the stream.
 * - When an epoch is complete and the next starts, the position moves to the highest seq of
 *   the finished epoch (a pwrite: it survives the process); so does a flush entry, alone in
 *   its epoch. Nothing else moves it: the entries submitted being a prefix, at those two
 *   moments every lower entry is applied. A flush of all the stream's devices makes the
 *   position durable (power loss, position.ts).
 * - An entry whose apply fails holds every later epoch back: those are refused (EIO), never
 *   applied without it, until the sender retries it or says it starts over (`restart`: a
 *   RESTART frame, which it sends only once it knows the fate of every entry it sent). This
 *   holds for pipelined connections (feature 'pipeline'); a sender without it drains each
 *   epoch, so its next epoch means it dealt with the failure.
 * - Entries without a seq (resync copies) are applied at once, outside the order.
 *
 * A stream belongs to at most one connection at a time (`owner`); a new connection takes it
 * over only once the old one's writes have finished (`idle`).
 */
import { EMPTY, type Bio } from '../core/bio.ts';
import { DmError } from '../core/errors.ts';
import type { BlockDev } from '../core/types.ts';
import { PositionFile } from './position.ts';
import { ProtocolError } from './protocol.ts';

const FLUSH: Bio = { op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} };

interface Waiting {
  readonly owner: object;
  readonly seq: number;
  readonly epoch: number;
  readonly apply: () => Promise<void>;
  readonly pipelined: boolean;
  readonly resolve: (r: 'applied' | 'duplicate') => void;
  readonly reject: (err: unknown) => void;
}

export class Stream {
  readonly id: string;
  readonly pos: PositionFile;
  owner: object | null = null;
  /** the sender's group role as its last STATE said (a demoted sender lets this site be promoted while connected) */
  senderRole: 'primary' | 'secondary' = 'primary';
  /** its last STATE said it demoted with every one of its sites in sync (a promotion here is a planned move) */
  senderAllInSync = false;
  /** the receiving devices of the stream, by name: the receiver's way in to each (flushed together) */
  readonly devices = new Map<string, BlockDev>();
  /** entries skipped as already applied, since the daemon started */
  duplicates = 0;
  /** RESTARTs taken since the daemon started */
  restarts = 0;
  #epoch: number;
  /** highest seq started in the current epoch */
  #maxSeq: number;
  /** seqs of the current epoch whose apply failed and has not succeeded since (the position must not pass them) */
  readonly #failed = new Set<number>();
  /**
   * An entry of the current epoch failed here: later epochs of a pipelined connection are
   * refused (EIO) rather than applied without it, until the entry is applied after all (the
   * sender retried it) or the sender says it starts over (`restart`).
   */
  #broken = false;
  #inflight = 0;
  #waiting: Waiting[] = [];
  #idle: Array<() => void> = [];

  constructor(id: string, pos: PositionFile) {
    this.id = id;
    this.pos = pos;
    this.#epoch = pos.epoch;
    this.#maxSeq = pos.applied;
  }

  get inflight(): number {
    return this.#inflight;
  }

  /**
   * The highest seq started (applied or in flight, of the current epoch when above the
   * position): the position moves to it when the epoch ends. OPEN_OK reports it, so that a
   * sender can tell entries begun here that its log lost (src/targets/replicator-lost.ts).
   */
  get started(): number {
    return this.#maxSeq;
  }

  /** resolves once no write of any connection is in flight */
  idle(): Promise<void> {
    if (this.#inflight === 0) return Promise.resolve();
    return new Promise((r) => this.#idle.push(r));
  }

  /**
   * Apply entry `seq` of `epoch` with `apply` in the stream's order, for connection `owner`.
   * Resolves 'duplicate' for an entry applied before; rejects with a ProtocolError for an
   * entry of an epoch already finished, with EIO for a later epoch of a `pipelined`
   * connection while a failed entry holds the stream back, or with `apply`'s own error.
   */
  submit(owner: object, seq: number, epoch: number, apply: () => Promise<void>, pipelined = true): Promise<'applied' | 'duplicate'> {
    if (seq <= this.pos.applied) {
      this.duplicates++;
      return Promise.resolve('duplicate');
    }
    if (epoch < this.#epoch) {
      return Promise.reject(new ProtocolError(`entry ${seq} of epoch ${epoch} arrived after epoch ${this.#epoch} began`));
    }
    if (epoch > this.#epoch && this.#broken) {
      // a sender that drains each epoch sends a later one only once it dealt with the failure
      if (!pipelined) this.#broken = false;
      else return Promise.reject(this.#brokenError(seq));
    }
    if (epoch > this.#epoch && (this.#inflight > 0 || this.#waiting.length > 0)) {
      return new Promise((resolve, reject) => this.#waiting.push({ owner, seq, epoch, apply, pipelined, resolve, reject }));
    }
    return this.#run(seq, epoch, apply);
  }

  /**
   * RESTART: the sender ships again from `seq` on, in log order, and knows the fate of
   * every entry it sent before (those below `seq` it did not get applied are in its dirty
   * logs). A failed entry no longer holds later epochs back; one at or above `seq` comes
   * again before them. Returns whether one held them back.
   */
  restart(seq: number): boolean {
    const was = this.#broken;
    this.#broken = false;
    this.restarts++;
    return was;
  }

  /**
   * REWIND (feature 'rewind'): the sender holds this site's acknowledgement of every entry
   * up to `seq`, and no entry after it that this site began (they were lost there: a power
   * loss before its log was flushed); it numbers new entries from `seq + 1` again. The
   * position, and the highest seq started, become (`seq`, `epoch`), durably, so that those
   * entries are applied when they come instead of skipped as duplicates. Rejects (EBUSY)
   * while a write of the stream is in flight (the caller waits for `idle` first). Resolves
   * with the position it had.
   */
  async rewind(seq: number, epoch: number): Promise<number> {
    const was = this.pos.applied;
    if (this.#inflight > 0 || this.#waiting.length > 0) throw new DmError('EBUSY', `REWIND while writes of stream ${this.id} are in flight`);
    this.#epoch = epoch;
    this.#maxSeq = seq;
    this.#failed.clear();
    this.#broken = false;
    await this.pos.rewind(seq, epoch);
    return was;
  }

  #brokenError(seq: number): DmError {
    return new DmError('EIO', `entry ${seq} not applied: an entry of epoch ${this.#epoch} failed at this site`);
  }

  /** a connection went away: its entries still waiting are dropped (never acknowledged, the sender re-sends them) */
  drop(owner: object, err: Error): void {
    const keep: Waiting[] = [];
    for (const w of this.#waiting) {
      if (w.owner === owner) w.reject(err);
      else keep.push(w);
    }
    this.#waiting = keep;
  }

  /**
   * A tagged flush entry (`seq`, alone in its epoch) was applied: every entry before it was
   * submitted before it and, nothing being in flight, is applied, so the position moves to
   * it (if the next epoch has started meanwhile, its start moved the position there).
   */
  flushedEntry(seq: number, epoch: number): void {
    if (this.#inflight === 0 && this.#failed.size === 0 && seq > this.pos.applied) {
      this.pos.record(Math.max(seq, this.#maxSeq), Math.max(epoch, this.#epoch));
    }
  }

  /**
   * Flush every device the stream was ever opened on (those of an earlier connection too),
   * then make the position recorded when this began durable. (Entries merely in flight or
   * acknowledged in the current epoch do not move it: only an epoch's end, or a flush
   * entry, does.)
   */
  async sync(): Promise<void> {
    const at = { applied: this.pos.applied, epoch: this.pos.epoch }; // only what was applied before the flush began
    const rewinds = this.pos.rewinds;
    await Promise.all([...this.devices].map(([name, w]) => w.submit(FLUSH).catch((err: { code?: string }) => {
      if (err.code !== 'ENXIO') throw err;
      this.devices.delete(name); // removed at this site since: nothing of it to make durable
    })));
    await this.pos.sync(at, rewinds);
  }

  #run(seq: number, epoch: number, apply: () => Promise<void>): Promise<'applied'> {
    if (epoch > this.#epoch) this.#advance(epoch);
    this.#inflight++;
    if (seq > this.#maxSeq) this.#maxSeq = seq;
    return apply().then(
      () => {
        // a failed entry applied again after all
        if (this.#failed.delete(seq) && this.#failed.size === 0) this.#broken = false;
        this.#done();
        return 'applied' as const;
      },
      (err: unknown) => {
        this.#failed.add(seq);
        this.#broken = true;
        this.#done();
        throw err;
      },
    );
  }

  /** the current epoch is complete: the position moves past it */
  #advance(epoch: number): void {
    const applied = this.#failed.size === 0 ? this.#maxSeq : Math.min(...this.#failed) - 1;
    this.pos.record(Math.max(applied, this.pos.applied), epoch);
    this.#epoch = epoch;
    // an entry that failed and was never applied since was given up by the sender (it went
    // to its dirty logs, which resync that region): the next epoch's position may pass it
    this.#failed.clear();
  }

  #done(): void {
    if (--this.#inflight > 0) return;
    if (this.#broken && this.#waiting.length > 0) {
      // pipelined entries of later epochs: never applied without the failed one
      const refused = this.#waiting.filter((w) => w.pipelined);
      this.#waiting = this.#waiting.filter((w) => !w.pipelined);
      for (const w of refused) w.reject(this.#brokenError(w.seq));
      if (this.#waiting.length > 0) this.#broken = false; // a draining sender moved on (submit)
    }
    // the epoch is complete: start the waiting entries of the next one (in arrival order)
    if (this.#waiting.length > 0) {
      const epoch = Math.min(...this.#waiting.map((w) => w.epoch));
      const now = this.#waiting.filter((w) => w.epoch === epoch);
      this.#waiting = this.#waiting.filter((w) => w.epoch !== epoch);
      for (const w of now) {
        if (w.seq <= this.pos.applied) {
          this.duplicates++;
          w.resolve('duplicate');
        } else {
          this.#run(w.seq, w.epoch, w.apply).then(w.resolve, w.reject);
        }
      }
      if (this.#inflight > 0) return;
    }
    const idle = this.#idle;
    this.#idle = [];
    for (const r of idle) r();
  }
}

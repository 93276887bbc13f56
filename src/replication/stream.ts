/**
 * One replication stream at the receiver: the entries of one sender's log (its uuid) over
 * one slink, applied to the receiver's devices in the group's order.
 *
 * - An entry with seq ≤ the persisted applied position was applied before (a re-send after
 *   a reconnect or a crash of either side): it is acknowledged and not applied again.
 * - Epochs are applied one after the other: an entry of a later epoch waits until every
 *   entry of the current one is done; entries of one epoch are applied concurrently.
 * - When an epoch is complete and the next starts, the position moves to the highest seq of
 *   the finished epoch (a pwrite: it survives the process); so does a flush entry, alone in
 *   its epoch. Nothing else moves it: the sender sends an epoch only once every entry of the
 *   one before is acknowledged, so at those two moments every lower entry is applied. A
 *   flush of all the stream's devices makes the position durable (power loss, position.ts).
 * - Entries without a seq (resync copies) are applied at once, outside the order.
 *
 * A stream belongs to at most one connection at a time (`owner`); a new connection takes it
 * over only once the old one's writes have finished (`idle`).
 */
import { EMPTY, type Bio } from '../core/bio.ts';
import type { BlockDev } from '../core/types.ts';
import { PositionFile } from './position.ts';

const FLUSH: Bio = { op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} };
import { ProtocolError } from './protocol.ts';

interface Waiting {
  readonly owner: object;
  readonly seq: number;
  readonly epoch: number;
  readonly apply: () => Promise<void>;
  readonly resolve: (r: 'applied' | 'duplicate') => void;
  readonly reject: (err: unknown) => void;
}

export class Stream {
  readonly id: string;
  readonly pos: PositionFile;
  owner: object | null = null;
  /** the sender's group role as its last STATE said (a demoted sender lets this site be promoted while connected) */
  senderRole: 'primary' | 'secondary' = 'primary';
  /** the receiving devices of the stream, by name: the receiver's way in to each (flushed together) */
  readonly devices = new Map<string, BlockDev>();
  /** entries skipped as already applied, since the daemon started */
  duplicates = 0;
  #epoch: number;
  /** highest seq started in the current epoch */
  #maxSeq: number;
  /** seqs of the current epoch whose apply failed and has not succeeded since (the position must not pass them) */
  readonly #failed = new Set<number>();
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

  /** resolves once no write of any connection is in flight */
  idle(): Promise<void> {
    if (this.#inflight === 0) return Promise.resolve();
    return new Promise((r) => this.#idle.push(r));
  }

  /**
   * Apply entry `seq` of `epoch` with `apply` in the stream's order, for connection `owner`.
   * Resolves 'duplicate' for an entry applied before; rejects with a ProtocolError for an
   * entry of an epoch already finished, or with `apply`'s own error.
   */
  submit(owner: object, seq: number, epoch: number, apply: () => Promise<void>): Promise<'applied' | 'duplicate'> {
    if (seq <= this.pos.applied) {
      this.duplicates++;
      return Promise.resolve('duplicate');
    }
    if (epoch < this.#epoch) {
      return Promise.reject(new ProtocolError(`entry ${seq} of epoch ${epoch} arrived after epoch ${this.#epoch} began`));
    }
    if (epoch > this.#epoch && (this.#inflight > 0 || this.#waiting.length > 0)) {
      return new Promise((resolve, reject) => this.#waiting.push({ owner, seq, epoch, apply, resolve, reject }));
    }
    return this.#run(seq, epoch, apply);
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
   * acknowledged before the sender sent it, so the position moves to it.
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
    await Promise.all([...this.devices].map(([name, w]) => w.submit(FLUSH).catch((err: { code?: string }) => {
      if (err.code !== 'ENXIO') throw err;
      this.devices.delete(name); // removed at this site since: nothing of it to make durable
    })));
    await this.pos.sync(at);
  }

  #run(seq: number, epoch: number, apply: () => Promise<void>): Promise<'applied'> {
    if (epoch > this.#epoch) this.#advance(epoch);
    this.#inflight++;
    if (seq > this.#maxSeq) this.#maxSeq = seq;
    return apply().then(
      () => {
        this.#failed.delete(seq); // a failed entry applied again after all
        this.#done();
        return 'applied' as const;
      },
      (err: unknown) => {
        this.#failed.add(seq);
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

/**
 * One replication stream at the receiver: the entries of one sender's log (its uuid) over
 * one slink, applied to the receiver's devices in the group's order.
 *
 * - An entry with seq ≤ the persisted applied position was applied before (a re-send after
 *   a reconnect or a crash of either side): it is acknowledged and not applied again.
 * - Epochs are applied one after the other: an entry of a later epoch waits until every
 *   entry of the current one is done; entries of one epoch are applied concurrently.
 * - When an epoch is complete and the next starts, the position moves to the highest seq of
 *   the finished epoch (a pwrite: it survives the process); a flush makes it durable.
 * - Entries without a seq (resync copies) are applied at once, outside the order.
 *
 * A stream belongs to at most one connection at a time (`owner`); a new connection takes it
 * over only once the old one's writes have finished (`idle`).
 */
import { PositionFile } from './position.ts';
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
  /** entries skipped as already applied, since the daemon started */
  duplicates = 0;
  #epoch: number;
  /** highest seq started in the current epoch */
  #maxSeq: number;
  /** lowest seq of the current epoch that failed (the position must not pass it) */
  #failed = Infinity;
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
   * A flush of the stream's devices finished: when nothing is in flight, every entry up to
   * the highest started is applied, so the position moves there; then it is made durable.
   */
  async flushed(): Promise<void> {
    if (this.#inflight === 0 && this.#failed === Infinity && this.#maxSeq > this.pos.applied) this.pos.record(this.#maxSeq, this.#epoch);
    await this.pos.sync();
  }

  #run(seq: number, epoch: number, apply: () => Promise<void>): Promise<'applied'> {
    if (epoch > this.#epoch) this.#advance(epoch);
    this.#inflight++;
    if (seq > this.#maxSeq) this.#maxSeq = seq;
    return apply().then(
      () => {
        this.#done();
        return 'applied' as const;
      },
      (err: unknown) => {
        if (seq < this.#failed) this.#failed = seq;
        this.#done();
        throw err;
      },
    );
  }

  /** the current epoch is complete: the position moves past it */
  #advance(epoch: number): void {
    const applied = this.#failed === Infinity ? this.#maxSeq : this.#failed - 1;
    this.pos.record(Math.max(applied, this.pos.applied), epoch);
    this.#epoch = epoch;
    this.#failed = Infinity;
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

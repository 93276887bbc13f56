/**
 * The checkpoints of R1's and R1-tcp's plain-Node references: the durability a replicator
 * with a ring log owes before it reuses ring space, done as the engine does it on this
 * machine's files (replicator-group.ts #checkpoint, "light" checkpoints: the log and the
 * local device are files here, so neither is flushed; a power loss is told by the boot id).
 *
 * Steps, one checkpoint at a time: make the remote copy durable (`flushRemote`: an fdatasync
 * of the remote file, or a FLUSH over the socket that the receiver answers after its
 * fdatasyncs), then write a 4 KiB checkpoint record into the log's header area through a
 * second descriptor opened `O_DSYNC` (the engine's FUA slot write).
 *
 * Triggers, as the engine's: every 200 ms when something was appended since the last one,
 * and at once when half the ring was appended since the last one started.
 *
 * Ring space, as the engine's: an append waits while the ring holds more than it can take
 * of entries not covered by a finished checkpoint (one covers the requests done when it
 * started), and starts one if none runs. Bytes are counted, not positions: requests done
 * out of order free space as soon as they are done, which favours the reference.
 */
import fs from 'node:fs';

const TICK_MS = 200;
const SLOT = 4096;

export interface RefCheckpointSpec {
  /** ring bytes of the log (half of it appended since the last checkpoint starts one) */
  ringBytes: number;
  /** the log file and the byte offset of its two 4 KiB checkpoint slots (outside the ring) */
  log: string;
  slotsAt: number;
  /** make the remote copy durable */
  flushRemote(): Promise<void>;
}

export class RefCheckpoints {
  readonly #spec: RefCheckpointSpec;
  readonly #slotFd: number;
  readonly #slot = Buffer.alloc(SLOT);
  #timer: NodeJS.Timeout | null = null;
  #cp: Promise<void> = Promise.resolve();
  #running = false;
  #appended = 0;
  #dirty = false;
  #error: unknown = null;
  /** bytes appended, and of those the requests done, since the worker started */
  #appendedTotal = 0;
  #doneTotal = 0;
  /** bytes the last finished checkpoint covers (done when it started) */
  #covered = 0;
  /** appends waiting for ring space, in order */
  readonly #waiting: Array<{ bytes: number; go: () => void }> = [];
  /** the highest sequence number appended (written into each record) */
  seq = 0;
  /** checkpoints written since the worker started */
  count = 0;

  constructor(spec: RefCheckpointSpec) {
    this.#spec = spec;
    this.#slotFd = fs.openSync(spec.log, fs.constants.O_RDWR | fs.constants.O_DSYNC);
  }

  /** an append of `bytes`: `go` runs (now, or once a checkpoint freed room) when the ring can take it */
  reserve(bytes: number, go: () => void): void {
    if (this.#waiting.length === 0 && this.#fits(bytes)) return go();
    this.#waiting.push({ bytes, go });
    if (!this.#running) void this.#checkpoint();
  }

  #fits(bytes: number): boolean {
    return this.#appendedTotal - this.#covered + bytes <= this.#spec.ringBytes;
  }

  /** `bytes` were appended to the ring (sequence number `seq`): a checkpoint at half a ring */
  appended(bytes: number, seq: number): void {
    this.seq = seq;
    this.#appended += bytes;
    this.#appendedTotal += bytes;
    this.#dirty = true;
    if (this.#timer && !this.#running && this.#appended * 2 > this.#spec.ringBytes) void this.#checkpoint();
  }

  /** the request of an entry of `bytes` is done (its local and remote writes) */
  done(bytes: number): void {
    this.#doneTotal += bytes;
  }

  #checkpoint(): Promise<void> {
    this.#running = true;
    this.#appended = 0;
    this.#dirty = false;
    const covers = this.#doneTotal;
    const run = this.#cp.then(async () => {
      await this.#spec.flushRemote();
      this.#slot.writeDoubleLE(++this.count, 0);
      this.#slot.writeDoubleLE(this.seq, 8);
      const at = this.#spec.slotsAt + SLOT * (this.count % 2);
      await new Promise<void>((res, rej) => fs.write(this.#slotFd, this.#slot, 0, SLOT, at, (e) => (e ? rej(e) : res())));
      this.#covered = covers;
    });
    const cp = run.catch((err: unknown) => void (this.#error ??= err)).finally(() => {
      if (this.#cp === cp) this.#running = false;
      this.#wake();
    });
    this.#cp = cp;
    return cp;
  }

  /** appends that fit now go on; if some still wait, another checkpoint */
  #wake(): void {
    if (this.#error) {
      for (const w of this.#waiting.splice(0)) w.go(); // stop() throws the error
      return;
    }
    while (this.#waiting.length > 0 && this.#fits(this.#waiting[0]!.bytes)) this.#waiting.shift()!.go();
    if (this.#waiting.length > 0 && !this.#running) void this.#checkpoint();
  }

  /** checkpoints on, for a run */
  start(): void {
    this.#error = null;
    this.#timer = setInterval(() => {
      if (this.#dirty && !this.#running) void this.#checkpoint();
    }, TICK_MS);
  }

  /** checkpoints off; waits for one running, and throws what failed */
  async stop(): Promise<void> {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
    await this.#cp;
    if (this.#error) throw this.#error;
  }
}

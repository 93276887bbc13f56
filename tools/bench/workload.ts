/**
 * The I/O pattern driver shared by both sides of a library benchmark: `qd` slots, each with
 * its own buffer, each issuing the next request as soon as its previous one completes, until
 * the deadline. Offsets are sequential (wrapping) or seeded-random and aligned to the block
 * size, so dmkit and its reference see exactly the same offsets in the same order.
 *
 * The side under test only supplies `IoFactory`: given a slot's buffer, a function that
 * starts one request at a byte position and calls `done(err?)` once it completes. Slots
 * (buffers and their I/O functions) are made once per process and reused by every run, so
 * runs differ in nothing but time.
 */

export interface Pattern {
  /** stable id used in reports and `--patterns` filters, e.g. `rand-read-4k-qd32` */
  id: string;
  op: 'read' | 'write';
  /** request size in bytes (a multiple of 512) */
  bs: number;
  /** requests in flight */
  qd: number;
  access: 'seq' | 'random';
}

export type Done = (err?: unknown) => void;
export type SlotIo = (pos: number, done: Done) => void;
export type IoFactory = (buf: Buffer) => SlotIo;

export interface DriveResult {
  ops: number;
  bytes: number;
  seconds: number;
}

/** xorshift32: small, fast, seedable; the same seed gives the same offsets on both sides */
export function rng(seed: number): () => number {
  let s = seed >>> 0 || 0x9e3779b9;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
}

/** Deterministic, incompressible-looking contents for written blocks and the image. */
export function fillPattern(buf: Buffer, salt: number): Buffer {
  const next = rng(salt * 2654435761 + 1);
  for (let i = 0; i + 4 <= buf.length; i += 4) buf.writeUInt32LE(next(), i);
  return buf;
}

/** One request slot: its buffer (reused for every request) and its I/O function. */
export interface Slot {
  buf: Buffer;
  io: SlotIo;
}

/** `p.qd` slots, each with its own buffer; make them once and reuse them across runs. */
export function makeSlots(factory: IoFactory, p: Pattern): Slot[] {
  const slots: Slot[] = [];
  for (let i = 0; i < p.qd; i++) {
    const buf = p.op === 'write' ? fillPattern(Buffer.alloc(p.bs), i + 1) : Buffer.alloc(p.bs);
    slots.push({ buf, io: factory(buf) });
  }
  return slots;
}

/** Run the pattern over `slots` for `seconds`; offsets from `seed` (same seed, same offsets). */
export function drive(slots: readonly Slot[], p: Pattern, span: number, seconds: number, seed: number): Promise<DriveResult> {
  const blocks = Math.floor(span / p.bs);
  if (blocks < 1) return Promise.reject(new Error(`span ${span} is smaller than one ${p.bs}-byte block`));
  const random = rng(seed);
  let seq = 0;
  const nextPos = p.access === 'random'
    ? (): number => (random() % blocks) * p.bs
    : (): number => {
        const pos = seq * p.bs;
        seq = seq + 1 === blocks ? 0 : seq + 1;
        return pos;
      };
  return new Promise((resolve, reject) => {
    let ops = 0;
    let active = slots.length;
    let failed = false;
    const start = performance.now();
    const deadline = start + seconds * 1000;
    const finish = (): void => {
      const secs = (performance.now() - start) / 1000;
      resolve({ ops, bytes: ops * p.bs, seconds: secs });
    };
    for (const { io } of slots) {
      const step: Done = (err) => {
        if (failed) return;
        if (err) {
          failed = true;
          reject(err);
          return;
        }
        ops++;
        if (performance.now() >= deadline) {
          if (--active === 0) finish();
          return;
        }
        io(nextPos(), step);
      };
      io(nextPos(), step);
    }
  });
}

/**
 * Recycled READ buffers. Every READ needs a fresh buffer the handle fills and the socket
 * sends; allocating them anew (256 KiB each under nbdcopy) made garbage collection the
 * largest CPU cost of the transmission loop. Buffers are kept in power-of-two classes from
 * 4 KiB to 4 MiB, up to `maxBytes` in total; smaller reads come from Node's own slab and
 * larger ones are allocated directly.
 *
 * A buffer goes back to the pool only from the write callback of the last socket write that
 * carries it (writes on a stream complete in order), so the socket never sends a buffer that
 * is being refilled. Buffers whose reply was abandoned are simply dropped.
 */
import { ioBuffer } from '../core/io-buffer.ts';

const MIN_SHIFT = 12;
const MAX_SHIFT = 22;

export class BufferPool {
  readonly #free: Buffer[][] = [];
  readonly #maxBytes: number;
  #held = 0;

  constructor(maxBytes: number) {
    this.#maxBytes = maxBytes;
    for (let s = MIN_SHIFT; s <= MAX_SHIFT; s++) this.#free.push([]);
  }

  /** bytes currently idle in the pool */
  get held(): number {
    return this.#held;
  }

  /**
   * A buffer of at least `length` bytes (contents undefined). Returns the backing buffer; the
   * caller uses `subarray(0, length)` and later hands the backing buffer to `put`.
   */
  get(length: number): Buffer {
    const shift = classOf(length);
    if (shift < 0) return Buffer.allocUnsafe(length);
    const list = this.#free[shift - MIN_SHIFT]!;
    const b = list.pop();
    if (b) {
      this.#held -= b.length;
      return b;
    }
    return ioBuffer(1 << shift);
  }

  /** return a backing buffer obtained from `get` (others are ignored) */
  put(b: Buffer): void {
    const shift = classOf(b.length);
    if (shift < 0 || b.length !== 1 << shift || this.#held + b.length > this.#maxBytes) return;
    this.#free[shift - MIN_SHIFT]!.push(b);
    this.#held += b.length;
  }
}

/** the size class (log2) for `length`, or -1 if it is not pooled */
function classOf(length: number): number {
  if (length < 1 << MIN_SHIFT || length > 1 << MAX_SHIFT) return -1;
  const shift = 32 - Math.clz32(length - 1);
  return Math.max(shift, MIN_SHIFT);
}

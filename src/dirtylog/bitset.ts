/**
 * A fixed-size bitset in the kernel's little-endian bit order: bit i is bit (i mod 8) of
 * byte ⌊i/8⌋, which is also bit (i mod 32) of the ⌊i/32⌋-th little-endian 32-bit word.
 * One bit per region and nothing else; it may live inside a larger I/O buffer (the disk
 * log keeps its clean bits in the buffer it writes).
 */

/** bytes that hold `bits` bits, rounded up to whole 64-bit words (the kernel's unsigned longs) */
export function bitsetBytes(bits: number): number {
  return Math.ceil(bits / 64) * 8;
}

const POPCOUNT = new Uint8Array(256);
for (let i = 1; i < 256; i++) POPCOUNT[i] = (i & 1) + POPCOUNT[i >> 1]!;

export class Bitset {
  /** number of bits in use; bits from `size` to the end of `bytes` are padding, kept 0 */
  readonly size: number;
  readonly bytes: Uint8Array;

  /** `bytes` (at least `bitsetBytes(size)` long) is used in place; by default a new zeroed array */
  constructor(size: number, bytes: Uint8Array = new Uint8Array(bitsetBytes(size))) {
    if (bytes.length * 8 < size) throw new RangeError(`bitset of ${size} bits needs ${bitsetBytes(size)} bytes, got ${bytes.length}`);
    this.size = size;
    this.bytes = bytes;
  }

  get(i: number): boolean {
    return (this.bytes[i >>> 3]! & (1 << (i & 7))) !== 0;
  }

  set(i: number): void {
    this.bytes[i >>> 3]! |= 1 << (i & 7);
  }

  clear(i: number): void {
    this.bytes[i >>> 3]! &= ~(1 << (i & 7));
  }

  /** set or clear every bit in [0, size); the padding is always cleared */
  fill(value: boolean): void {
    this.bytes.fill(0);
    if (!value) return;
    const whole = this.size >>> 3;
    this.bytes.fill(0xff, 0, whole);
    for (let i = whole * 8; i < this.size; i++) this.set(i);
  }

  /** set (value true) or clear every bit in [from, to) */
  fillRange(from: number, to: number, value: boolean): void {
    let i = from;
    for (; i < to && (i & 7) !== 0; i++) this.#put(i, value);
    const wholeEnd = to & ~7;
    if (i < wholeEnd) {
      this.bytes.fill(value ? 0xff : 0, i >>> 3, wholeEnd >>> 3);
      i = wholeEnd;
    }
    for (; i < to; i++) this.#put(i, value);
  }

  /** clear the padding bits from `size` to the end of the bytes */
  clearPadding(): void {
    const end = this.bytes.length * 8;
    if (this.size < end) this.fillRange(this.size, end, false);
  }

  /** number of set bits in [0, size) (padding must be clear) */
  count(): number {
    let n = 0;
    const b = this.bytes;
    const used = Math.ceil(this.size / 8);
    for (let i = 0; i < used; i++) n += POPCOUNT[b[i]!]!;
    return n;
  }

  /** the first clear bit at or after `from`, or `size` when there is none */
  nextClear(from: number): number {
    const b = this.bytes;
    let i = from;
    while (i < this.size) {
      if ((i & 7) === 0 && b[i >>> 3] === 0xff) {
        i += 8;
        continue;
      }
      if (!this.get(i)) return i;
      i++;
    }
    return this.size;
  }

  /** copy another bitset of the same size into this one */
  copyFrom(other: Bitset): void {
    this.bytes.set(other.bytes.subarray(0, this.bytes.length));
  }

  #put(i: number, value: boolean): void {
    if (value) this.set(i);
    else this.clear(i);
  }
}

/**
 * Space in the ring area of a `ringbuffer` log: byte offsets of the tail (the oldest kept
 * entry, or the wrap marker before it) and of the head (where the next entry or wrap
 * marker goes), the bytes in use between them, and where a new entry is placed.
 *
 * The ring area is `ringBytes` long. An entry never ends in the area's last sector: that
 * sector is kept so that a wrap marker always fits at the head. When an entry does not fit
 * before it, a wrap marker is written at the head and the entry goes to offset 0; the
 * bytes from the marker to the area's end count as used until the tail passes them. So the
 * layout describes itself (readers follow markers, never the area's size), and an entry of
 * at most `maxEntryBytes` (half the ring) always fits in an empty ring, wherever the head is.
 */
import { ENTRY_HEADER_BYTES } from './ring-format.ts';

export class RingSpace {
  #ring: number;
  #tail: number;
  #head: number;
  #used: number;
  /** the wrap marker's offset of the last `take`, or -1 when it did not wrap */
  #marker = -1;

  /**
   * `ringBytes` of ring (a multiple of 512, at least 2 KiB), kept entries from `tail` to
   * `head` taking `used` bytes (wrap waste included).
   */
  constructor(ringBytes: number, tail: number, head: number, used: number) {
    this.#ring = ringBytes;
    this.#tail = tail;
    this.#head = head;
    this.#used = used;
  }

  get ringBytes(): number {
    return this.#ring;
  }
  get tailOffset(): number {
    return this.#tail;
  }
  get headOffset(): number {
    return this.#head;
  }
  get usedBytes(): number {
    return this.#used;
  }
  get freeBytes(): number {
    return this.#ring - this.#used;
  }

  /** the largest entry (header + padded payload) accepted: fits in an empty ring from any head */
  get maxEntryBytes(): number {
    return maxEntryBytes(this.#ring);
  }

  /** the offset of the wrap marker the last successful `take` needs, or -1 */
  get marker(): number {
    return this.#marker;
  }

  /**
   * Place an entry of `bytes` (≤ maxEntryBytes) at the head and take its space: returns the
   * entry's offset, or -1 when it does not fit in the free space (nothing taken). When the
   * entry wraps, `marker` says where its wrap marker goes.
   */
  take(bytes: number): number {
    const head = this.#head;
    const limit = this.#ring - ENTRY_HEADER_BYTES;
    const wraps = head + bytes > limit;
    const cost = wraps ? this.#ring - head + bytes : bytes;
    if (this.#used + cost > this.#ring) return -1;
    this.#used += cost;
    this.#marker = wraps ? head : -1;
    const at = wraps ? 0 : head;
    this.#head = at + bytes;
    return at;
  }

  /**
   * The tail moves forward to `offset` (an entry's or a wrap marker's), or to the head when
   * `all` (every entry is freed). Frees the bytes it passes.
   */
  release(offset: number, all: boolean): void {
    if (all) {
      this.#used = 0;
      this.#tail = this.#head;
      return;
    }
    this.#used -= (offset - this.#tail + this.#ring) % this.#ring;
    this.#tail = offset;
  }

  /** true when the kept entries do not wrap: they lie in [tailOffset, headOffset) */
  isLinear(): boolean {
    return this.#tail + this.#used === this.#head;
  }

  /**
   * A new ring size. The kept entries must lie below `ringBytes` − 512 (the caller checks);
   * an empty ring may move its tail and head to `moveTo`.
   */
  resize(ringBytes: number, moveTo: number | null): void {
    this.#ring = ringBytes;
    if (moveTo !== null && this.#used === 0) {
      this.#tail = moveTo;
      this.#head = moveTo;
    }
  }
}

/** half the ring, less the marker sector, in whole sectors */
export function maxEntryBytes(ringBytes: number): number {
  return Math.floor((ringBytes - ENTRY_HEADER_BYTES) / 1024) * 512;
}

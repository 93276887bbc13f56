/**
 * Where the entries of a `ringbuffer` log are, in bounded memory:
 *
 *   - `EntryCache`: the most recently appended entries, in seq order: offset, size, CRCs,
 *     the append's promise while its writes run, and (small entries) the entry image the
 *     append wrote, so that readers near the head never read the device. Bounded by image
 *     bytes and by slot count; entries still being written are never dropped.
 *   - `PositionHints`: a fixed number of (seq, offset) samples, one every `ringBytes / 128`
 *     appended bytes, from which a reader or a checkpoint walks forward to any older entry
 *     by reading headers (at most one sample stride of them).
 *
 * Neither grows with the ring's size or its backlog.
 */
import type { ReplogEntry } from './types.ts';

/** One recently appended entry. */
export interface Slot {
  readonly seq: number;
  /** ring offset of the entry's header (0 after a wrap: the marker is elsewhere) */
  readonly off: number;
  /** ring bytes of the entry itself: header + padded payload */
  readonly bytes: number;
  readonly crc: number;
  /** CRC of entry seq − 1, stored in this entry's header */
  readonly prevCrc: number;
  /** what readers get, while the image is cached; null for entries written from the caller's buffer */
  readonly entry: ReplogEntry | null;
  /** image bytes this slot keeps alive */
  readonly cost: number;
  /** writes still running for it (entry, wrap marker) */
  writes: number;
  /** settle the append's promise; null once settled */
  resolve: ((seq: number) => void) | null;
  reject: ((err: Error) => void) | null;
}

/** The default bound on cached entry images: 32 MiB (32 of the largest entries the replicator makes). */
export const CACHE_BYTES = 32 * 1024 * 1024;
/** the most slots kept, whatever their size */
export const CACHE_SLOTS = 16384;

export class EntryCache {
  readonly #maxBytes: number;
  readonly #maxSlots: number;
  /** circular storage, power-of-two capacity */
  #ring: (Slot | undefined)[] = new Array<Slot | undefined>(64);
  #start = 0;
  #count = 0;
  #bytes = 0;

  constructor(maxBytes = CACHE_BYTES, maxSlots = CACHE_SLOTS) {
    this.#maxBytes = maxBytes;
    this.#maxSlots = maxSlots;
  }

  /** Add the next entry (its seq follows the last one's, or the cache is empty). */
  push(slot: Slot): void {
    if (this.#count === this.#ring.length) this.#grow();
    this.#ring[(this.#start + this.#count) & (this.#ring.length - 1)] = slot;
    this.#count++;
    this.#bytes += slot.cost;
  }

  /** the slot of `seq`, if cached */
  get(seq: number): Slot | undefined {
    if (this.#count === 0) return undefined;
    const i = seq - this.#ring[this.#start]!.seq;
    if (i < 0 || i >= this.#count) return undefined;
    return this.#ring[(this.#start + i) & (this.#ring.length - 1)];
  }

  /**
   * Drop slots from the oldest: those before `tailSeq` (freed), and while over budget those
   * up to `writtenSeq` (written: their append has settled). Slots still being written stay.
   */
  trim(writtenSeq: number, tailSeq: number): void {
    while (this.#count > 0) {
      const s = this.#ring[this.#start]!;
      const over = this.#bytes > this.#maxBytes || this.#count > this.#maxSlots;
      if (s.seq > writtenSeq || (s.seq >= tailSeq && !over)) return;
      this.#shift();
    }
  }

  /** Forget everything (recovery starts over). */
  clear(): void {
    this.#ring = new Array<Slot | undefined>(64);
    this.#start = 0;
    this.#count = 0;
    this.#bytes = 0;
  }

  /** every cached slot from `seq` on, oldest first */
  *from(seq: number): IterableIterator<Slot> {
    for (let s = this.get(seq); s; s = this.get(s.seq + 1)) yield s;
  }

  #shift(): void {
    const s = this.#ring[this.#start]!;
    this.#ring[this.#start] = undefined;
    this.#start = (this.#start + 1) & (this.#ring.length - 1);
    this.#count--;
    this.#bytes -= s.cost;
  }

  #grow(): void {
    const next = new Array<Slot | undefined>(this.#ring.length * 2);
    for (let i = 0; i < this.#count; i++) next[i] = this.#ring[(this.#start + i) & (this.#ring.length - 1)];
    this.#ring = next;
    this.#start = 0;
  }
}

/** A known entry position: seq, ring offset of its header (or wrap marker), its back link. */
export interface Position {
  readonly seq: number;
  readonly off: number;
  readonly prevCrc: number;
}

/** samples kept: two laps of the ring at one per 1/128 */
export const HINT_SAMPLES = 256;
export const HINTS_PER_LAP = 128;

/** A fixed number of (seq, offset, prevCrc) samples in increasing seq order. */
export class PositionHints {
  readonly #cells = new Float64Array(HINT_SAMPLES * 3);
  #start = 0;
  #count = 0;

  /** Record a position; one with a seq not above the newest sample's restarts the samples. */
  add(seq: number, off: number, prevCrc: number): void {
    if (this.#count > 0 && seq <= this.#seqAt(this.#count - 1)) this.clear();
    let i: number;
    if (this.#count < HINT_SAMPLES) i = (this.#start + this.#count++) % HINT_SAMPLES;
    else {
      i = this.#start;
      this.#start = (this.#start + 1) % HINT_SAMPLES;
    }
    this.#cells[i * 3] = seq;
    this.#cells[i * 3 + 1] = off;
    this.#cells[i * 3 + 2] = prevCrc;
  }

  /** the sample with the highest seq in [minSeq, seq], or null */
  before(seq: number, minSeq: number): Position | null {
    let lo = 0;
    let hi = this.#count - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.#seqAt(mid) <= seq) {
        found = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    if (found < 0 || this.#seqAt(found) < minSeq) return null;
    const c = ((this.#start + found) % HINT_SAMPLES) * 3;
    return { seq: this.#cells[c]!, off: this.#cells[c + 1]!, prevCrc: this.#cells[c + 2]! };
  }

  clear(): void {
    this.#start = 0;
    this.#count = 0;
  }

  #seqAt(i: number): number {
    return this.#cells[((this.#start + i) % HINT_SAMPLES) * 3]!;
  }
}

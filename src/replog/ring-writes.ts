/**
 * The `ringbuffer` log's append writes, in fewer system calls and fewer buffers:
 *
 *   - `ImageSlab`: small entry images (header + padded payload) are carved one after the
 *     other from a 1 MiB buffer instead of each being a buffer (an ArrayBuffer, external
 *     memory for V8) of its own. A slab is never reused: it is freed by the garbage
 *     collector once no image carved from it is referenced (cache, reader, shipper, a remote
 *     write in flight), so no image's bytes ever change while anyone can still read them.
 *     A larger image (a payload over 64 KiB) is a buffer of its own; the slab remembers the
 *     newest ones (`retain`), and once the replicator says nobody holds their entries any
 *     more and they are behind the ring's tail (`Replog.reclaim`), keeps them (up to
 *     SPARE_BYTES) for the next images of their size. Measured at 1 MiB writes: a fresh
 *     512 KiB image per entry (a fresh mmap, its pages zeroed and faulted in, external
 *     memory driving V8 into Mark-Compacts) cost more CPU than the copy and the CRC of the
 *     payload together.
 *   - `WriteQueue`: the ring writes of the appends made in one burst (until the running
 *     microtasks are done: process.nextTick) go out together, and consecutive entries whose
 *     images are neighbours in one slab and in the ring as one write. At 32 writers in
 *     flight the 32 appends of one turn were 32 writes of 4.5 KiB each.
 */
import { ioBuffer } from '../core/io-buffer.ts';

/** the size of a slab */
export const SLAB_BYTES = 1024 * 1024;
/** images larger than this get a buffer of their own (a slab would hold too few of them to matter) */
export const SLAB_MAX = 64 * 1024;

/**
 * at most this many bytes of larger images are kept for reuse: as much as a checkpoint of a
 * 64 MiB ring frees at once (measured at 1 MiB writes: with 32 MiB, 4 in 10 images were
 * fresh; with 64 MiB, none after the first lap, and the process's RSS was no larger)
 */
export const SPARE_BYTES = 64 * 1024 * 1024;
/** larger images of the newest entries remembered for reuse (`retain`): bounded, whatever the ring's size */
export const RETAIN_BYTES = 64 * 1024 * 1024;

export class ImageSlab {
  #slab: Buffer | null = null;
  #used = 0;
  /** larger images given back, by length */
  readonly #spare = new Map<number, Buffer[]>();
  #spareBytes = 0;
  /**
   * larger images of the newest entries, oldest first: each is given back once `reclaim`
   * passes its entry; at most RETAIN_BYTES are remembered (older ones are left to the GC)
   */
  readonly #retained: Array<{ readonly seq: number; readonly image: Buffer }> = [];
  #retainedBytes = 0;

  /** `bytes` of uninitialised memory that no other image shares */
  take(bytes: number): Buffer {
    if (bytes > SLAB_MAX) {
      const b = this.#spare.get(bytes)?.pop();
      if (!b) return ioBuffer(bytes);
      this.#spareBytes -= bytes;
      return b;
    }
    if (!this.#slab || this.#used + bytes > this.#slab.length) {
      this.#slab = ioBuffer(SLAB_BYTES);
      this.#used = 0;
    }
    const b = this.#slab.subarray(this.#used, this.#used + bytes);
    this.#used += bytes;
    return b;
  }

  /**
   * A larger image `take` returned that nobody reads any more: a later `take` of its length
   * may return it (kept while the spares stay within SPARE_BYTES; small images are left to
   * the garbage collector with their slab).
   */
  give(image: Buffer): void {
    const n = image.length;
    if (n <= SLAB_MAX || this.#spareBytes + n > SPARE_BYTES) return;
    let list = this.#spare.get(n);
    if (!list) this.#spare.set(n, (list = []));
    list.push(image);
    this.#spareBytes += n;
  }

  /**
   * `image` (from `take`) is entry `seq`'s: given back at a `reclaim` past `seq` (small ones:
   * never). At most `limit` bytes (the ring's size: older entries are overwritten anyway) and
   * RETAIN_BYTES are remembered.
   */
  retain(seq: number, image: Buffer, limit = RETAIN_BYTES): void {
    if (image.length <= SLAB_MAX) return;
    this.#retained.push({ seq, image });
    this.#retainedBytes += image.length;
    while (this.#retainedBytes > Math.min(limit, RETAIN_BYTES)) this.#retainedBytes -= this.#retained.shift()!.image.length;
  }

  /** nobody reads the images of entries before `belowSeq` any more: give them back */
  reclaim(belowSeq: number): void {
    const r = this.#retained;
    let n = 0;
    for (; n < r.length && r[n]!.seq < belowSeq; n++) {
      this.#retainedBytes -= r[n]!.image.length;
      this.give(r[n]!.image);
    }
    if (n > 0) r.splice(0, n);
  }

  /** bytes of images kept for reuse */
  get spareBytes(): number {
    return this.#spareBytes;
  }

  /** drop the spares and the images remembered (the log is recovered anew or destroyed) */
  clear(): void {
    this.#spare.clear();
    this.#spareBytes = 0;
    this.#retained.length = 0;
    this.#retainedBytes = 0;
  }
}

/** Ring writes waiting to be issued, in the order they were queued. */
export class WriteQueue<T> {
  #tags: T[] = [];
  #offs: number[] = [];
  #bufs: Buffer[] = [];

  /** Queue a write of `buf` at ring offset `off` for `tag`; true when the queue was empty (schedule a drain). */
  push(tag: T, off: number, buf: Buffer): boolean {
    this.#tags.push(tag);
    this.#offs.push(off);
    this.#bufs.push(buf);
    return this.#tags.length === 1;
  }

  /**
   * Empty the queue, in order: each run of writes whose ring ranges and buffers both follow
   * each other is handed to `write` as one buffer, with the tags of its writes in order.
   */
  drain(write: (off: number, buf: Buffer, tags: T[]) => void): void {
    const tags = this.#tags;
    const offs = this.#offs;
    const bufs = this.#bufs;
    if (tags.length === 0) return;
    this.#tags = [];
    this.#offs = [];
    this.#bufs = [];
    for (let i = 0; i < tags.length; ) {
      const first = bufs[i]!;
      let len = first.length;
      let j = i + 1;
      for (; j < tags.length; j++) {
        const b = bufs[j]!;
        if (offs[j] !== offs[i]! + len || b.buffer !== first.buffer || b.byteOffset !== first.byteOffset + len) break;
        len += b.length;
      }
      const buf = j === i + 1 ? first : Buffer.from(first.buffer, first.byteOffset, len);
      write(offs[i]!, buf, tags.slice(i, j));
      i = j;
    }
  }
}

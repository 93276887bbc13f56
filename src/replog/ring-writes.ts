/**
 * The `ringbuffer` log's append writes, in fewer system calls and fewer buffers:
 *
 *   - `ImageSlab`: small entry images (header + padded payload) are carved one after the
 *     other from a 1 MiB buffer instead of each being a buffer (an ArrayBuffer, external
 *     memory for V8) of its own. A slab is never reused: it is freed by the garbage
 *     collector once no image carved from it is referenced (cache, reader, shipper, a remote
 *     write in flight), so no image's bytes ever change while anyone can still read them.
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

export class ImageSlab {
  #slab: Buffer | null = null;
  #used = 0;

  /** `bytes` of uninitialised memory that no other image shares */
  take(bytes: number): Buffer {
    if (bytes > SLAB_MAX) return ioBuffer(bytes);
    if (!this.#slab || this.#used + bytes > this.#slab.length) {
      this.#slab = ioBuffer(SLAB_BYTES);
      this.#used = 0;
    }
    const b = this.#slab.subarray(this.#used, this.#used + bytes);
    this.#used += bytes;
    return b;
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

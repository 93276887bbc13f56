/**
 * Reading a `ringbuffer` log forward: the shippers' readers, and the walk that finds the
 * ring offset of an older entry from a known position by reading entry headers.
 *
 * A reader serves entries from the log's cache of recent entries when it can (no I/O, no
 * copy), and otherwise reads the ring in windows of up to 256 KiB, returning entries as
 * views of the window: each window is a new buffer, so an entry a shipper still holds is
 * never overwritten. Entries read from the device are CRC-checked; a reader never returns
 * an entry that has not been written (seq > head), nor one the ring has dropped (EOVERFLOW).
 */
import { BlockError } from '../core/errors.ts';
import { ioBuffer } from '../core/io-buffer.ts';
import { ENTRY_HEADER_BYTES, decodeEntryHeader, entryBytes, entryCrc, entrySeed } from './ring-format.ts';
import type { RingRecord } from './ring-format.ts';
import type { EntryCache, Position } from './ring-index.ts';
import type { LogDevice } from './ring-io.ts';
import type { ReplogEntry, ReplogReader } from './types.ts';

/** bytes a reader reads ahead from the device */
export const READ_AHEAD = 256 * 1024;
/** bytes the walk reads at a time (headers only) */
export const WALK_CHUNK = 64 * 1024;

/** What readers and the walk need of the log. */
export interface RingAccess {
  readonly uuid: Buffer;
  readonly io: LogDevice;
  readonly ringBytes: number;
  /** oldest kept seq */
  readonly tail: number;
  /** last seq written (in order) */
  readonly head: number;
  readonly cache: EntryCache;
  /** bumped when ring positions move (a resize of an empty ring): readers locate again */
  readonly moves: number;
  /** the position of entry `seq` (tail ≤ seq ≤ next to be appended); EOVERFLOW when dropped */
  locate(seq: number): Promise<Position>;
}

/** EOVERFLOW when `seq` was dropped meanwhile (what was read may be overwritten), else EIO. */
function readError(ring: RingAccess, seq: number, what: string): BlockError {
  if (seq < ring.tail) return overflow(ring, seq);
  return new BlockError('EIO', `ringbuffer: ${ring.io.ref}: entry ${seq}: ${what}`);
}

export function overflow(ring: { readonly tail: number }, seq: number): BlockError {
  return new BlockError('EOVERFLOW', `ringbuffer: entry ${seq} is no longer in the ring (the oldest kept is ${ring.tail})`);
}

/**
 * From `from` (an entry's position, or the wrap marker's before it), read headers forward to
 * the position of entry `target` (≤ head + 1); cached entries are stepped over without I/O.
 * Rejects EOVERFLOW when the entries were dropped meanwhile, EIO on a bad header.
 */
export async function walkTo(ring: RingAccess, from: Position, target: number): Promise<Position> {
  let { seq, off, prevCrc } = from;
  let buf: Buffer | null = null;
  let bufOff = 0;
  while (seq < target) {
    const slot = ring.cache.get(seq);
    if (slot) {
      off = slot.off + slot.bytes;
      prevCrc = slot.crc;
      seq++;
      continue;
    }
    if (!buf || off < bufOff || off + ENTRY_HEADER_BYTES > bufOff + buf.length) {
      buf = ioBuffer(Math.min(WALK_CHUNK, ring.ringBytes - off));
      bufOff = off;
      await ring.io.readRing(off, buf);
    }
    const rec: RingRecord | null = decodeEntryHeader(buf, off - bufOff, ring.uuid);
    if (!rec || rec.seq !== seq || (rec.kind === 'wrap' && off === 0)) {
      throw readError(ring, seq, `no valid header at ring offset ${off}`);
    }
    if (rec.kind === 'wrap') {
      off = 0;
      continue;
    }
    off += entryBytes(rec.payloadBytes);
    prevCrc = rec.crc;
    seq++;
  }
  if (seq < ring.tail) throw overflow(ring, seq);
  return { seq, off, prevCrc };
}

const noop = (): void => {};

export class RingReader implements ReplogReader {
  readonly #ring: RingAccess;
  #seq: number;
  /** ring offset of #seq's header or of the wrap marker before it; -1 until located */
  #off = -1;
  /** ring.moves when #off was found */
  #moves: number;
  /** the last window read, its ring offset, and the head when it was read */
  #win: Buffer | null = null;
  #winOff = 0;
  #winHead = 0;
  /** the running next(), so that calls made without waiting run in turn */
  #running: Promise<unknown> | null = null;

  constructor(ring: RingAccess, fromSeq: number) {
    this.#ring = ring;
    this.#seq = fromSeq;
    this.#moves = ring.moves;
  }

  get seq(): number {
    return this.#seq;
  }

  tryNext(): ReplogEntry | null | undefined {
    if (this.#running) return undefined;
    const ring = this.#ring;
    const seq = this.#seq;
    if (seq < ring.tail) return undefined; // next() reports it
    if (seq > ring.head) return null;
    if (ring.moves !== this.#moves) return undefined;
    const slot = ring.cache.get(seq);
    if (!slot?.entry) return undefined;
    this.#off = slot.off + slot.bytes;
    this.#seq = seq + 1;
    return slot.entry;
  }

  next(): Promise<ReplogEntry | null> {
    if (this.#running) {
      const p = this.#running.then(noop, noop).then(() => this.next());
      return p;
    }
    const ring = this.#ring;
    const seq = this.#seq;
    if (seq < ring.tail) return Promise.reject(overflow(ring, seq));
    if (seq > ring.head) return Promise.resolve(null);
    if (ring.moves !== this.#moves) {
      this.#moves = ring.moves;
      this.#off = -1;
      this.#win = null;
    }
    const slot = ring.cache.get(seq);
    if (slot?.entry) {
      this.#off = slot.off + slot.bytes;
      this.#seq = seq + 1;
      return Promise.resolve(slot.entry);
    }
    if (slot) this.#off = slot.off;
    const p = this.#read();
    this.#running = p;
    const clear = (): void => {
      if (this.#running === p) this.#running = null;
    };
    p.then(clear, clear);
    return p;
  }

  /** the entry #seq (≤ head) from the device */
  async #read(): Promise<ReplogEntry> {
    const ring = this.#ring;
    const seq = this.#seq;
    if (this.#off < 0) this.#off = (await ring.locate(seq)).off;
    for (let hops = 0; hops < 4; hops++) {
      const off = this.#off;
      if (!this.#covers(off, ENTRY_HEADER_BYTES)) await this.#load(off, READ_AHEAD);
      const win = this.#win!;
      const at = off - this.#winOff;
      const rec = decodeEntryHeader(win, at, ring.uuid);
      if (!rec || rec.seq !== seq) throw readError(ring, seq, `no valid header at ring offset ${off}`);
      if (rec.kind === 'wrap') {
        if (off === 0) throw readError(ring, seq, 'wrap marker at ring offset 0');
        this.#off = 0;
        continue;
      }
      const bytes = entryBytes(rec.payloadBytes);
      if (off + bytes > ring.ringBytes - ENTRY_HEADER_BYTES) throw readError(ring, seq, `entry at ring offset ${off} runs past the ring`);
      if (!this.#covers(off, bytes)) {
        await this.#load(off, Math.max(bytes, READ_AHEAD));
        continue;
      }
      if (entryCrc(win, at, null) !== rec.crc) throw readError(ring, seq, `CRC mismatch at ring offset ${off}`);
      const data = win.subarray(at + ENTRY_HEADER_BYTES, at + ENTRY_HEADER_BYTES + rec.payloadBytes);
      this.#off = off + bytes;
      this.#seq = seq + 1;
      return {
        seq, time: rec.time, devNr: rec.devNr, op: rec.op, sector: rec.sector, sectors: rec.sectors,
        epoch: rec.epoch, fua: rec.fua, data, payloadCrc: { seed: entrySeed(win, at), crc: rec.crc },
      };
    }
    throw readError(ring, seq, 'wrap markers lead nowhere');
  }

  /** the window holds ring bytes [off, off + n), read when entry #seq was already written */
  #covers(off: number, n: number): boolean {
    return this.#win !== null && this.#seq <= this.#winHead && off >= this.#winOff && off + n <= this.#winOff + this.#win.length;
  }

  async #load(off: number, n: number): Promise<void> {
    const ring = this.#ring;
    const len = Math.max(Math.min(n, ring.ringBytes - off), ENTRY_HEADER_BYTES);
    const buf = ioBuffer(len);
    const head = ring.head;
    this.#win = null;
    await ring.io.readRing(off, buf);
    if (this.#seq < ring.tail) throw overflow(ring, this.#seq);
    this.#win = buf;
    this.#winOff = off;
    this.#winHead = head;
  }
}

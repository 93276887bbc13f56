/**
 * The `ringbuffer` log at work: append, read, checkpoint, recover, resize. Opening and
 * argument parsing are in ringbuffer.ts; the format in ring-format.ts.
 *
 * Append is the hot path: the entry's seq and ring space are taken synchronously, in call
 * order; a small entry becomes one buffer (header + payload copy + padding, one CRC32C over
 * it) written with one bio, and the same buffer then serves the cache readers take entries
 * from. A payload of 256 KiB or more is written from the caller's buffer (header and payload
 * as two bios, no copy) and not cached. Writes may complete in any order; appends resolve in
 * seq order, each once it and every earlier entry are written. A failed write fails the
 * log: that append and every later one reject with EIO (recovery would stop at the hole).
 */
import { BlockError, toBlockError } from '../core/errors.ts';
import { heldHere } from '../core/file-dev.ts';
import { ioBuffer } from '../core/io-buffer.ts';
import { escapeArg } from '../core/table-parse.ts';
import type { StatusType } from '../core/types.ts';
import { CheckpointSlots, checkState, copyState, newestCheckpoint, oldestNeeded } from './ring-checkpoint.ts';
import type { Checkpoint, LogHeader } from './ring-format.ts';
import {
  DATA_SECTOR, ENTRY_HEADER_BYTES, MIN_LOG_SECTORS, encodeEntryHeader, encodeWrapMarker, entryBytes, entrySeed, initialCheckpoint,
  sealEntryFrom,
} from './ring-format.ts';
import { EntryCache, HINTS_PER_LAP, PositionHints } from './ring-index.ts';
import type { Position, Slot } from './ring-index.ts';
import type { LogDevice } from './ring-io.ts';
import { RingReader, overflow, walkTo } from './ring-reader.ts';
import type { RingAccess } from './ring-reader.ts';
import { scanRing } from './ring-recovery.ts';
import { RingSpace } from './ring-space.ts';
import { ImageSlab, WriteQueue } from './ring-writes.ts';
import type { AppendEntry, CheckpointState, Recovered, Replog, ReplogContext, ReplogEntry, ReplogReader } from './types.ts';

/**
 * Payloads of this size and more are written from the caller's buffer, not copied, and not
 * cached. Anything the replicator logs (at most 1 MiB per entry) is below it: one copy into
 * the entry image, then one write, and the image serves the shippers from memory (measured:
 * a 1 MiB entry read back from the log device per site cost more than the copy, and left
 * the site unable to keep up with a 1 MiB writer).
 */
export const BIG_PAYLOAD = 2 * 1024 * 1024;
const OPS: ReadonlySet<string> = new Set(['write', 'discard', 'write-zeroes', 'flush']);
const EMPTY = Buffer.alloc(0);
const noop = (): void => {};

/** ring bytes of a log of `size` sectors */
export function ringBytesOf(size: number): number {
  return (size - DATA_SECTOR) * 512;
}

/** bytes appended between two position samples: 1/128 of the ring, at least 4 KiB */
function hintStride(ringBytes: number): number {
  return Math.max(4096, Math.floor(ringBytes / HINTS_PER_LAP / 512) * 512);
}

interface Deferred {
  readonly e: AppendEntry;
  readonly resolve: (seq: number) => void;
  readonly reject: (err: Error) => void;
}

export class RingLog implements Replog {
  readonly type = 'ringbuffer';
  readonly #io: LogDevice;
  readonly #uuid: Buffer;
  readonly #cache = new EntryCache();
  /** where entries' images come from, and larger ones go back to for reuse (`reclaim`) */
  readonly #images = new ImageSlab();
  /** ring writes made by appends of this turn, not issued yet */
  readonly #queue = new WriteQueue<Slot>();
  /** what readers and the walk see of this log */
  readonly #access: RingAccess;
  readonly #ctx: ReplogContext;
  #header: LogHeader;
  readonly #release: () => void;
  readonly #hints = new PositionHints();
  #space: RingSpace;
  #slots: CheckpointSlots;
  #ready: boolean;
  /** an append was made: recover() may no longer run */
  #appended = false;
  #tailSeq = 1;
  #tailPrevCrc = 0;
  #written = 0;
  #nextSeq = 1;
  #lastCrc = 0;
  #sinceHint = Infinity;
  /** times the ring positions moved (see RingAccess.moves) */
  #moves = 0;
  #failed: BlockError | null = null;
  #closed = false;
  /** checkpoints and resizes run one at a time */
  #serial: Promise<void> = Promise.resolve();
  /** appends made while a resize rewrites the header, run after it */
  #deferred: Deferred[] | null = null;

  /**
   * `initial`: the checkpoint a new log was created with (the log is ready at once), or
   * null for an existing log, which `recover` must read first.
   */
  constructor(ctx: ReplogContext, io: LogDevice, header: LogHeader, initial: Checkpoint | null, release: () => void) {
    this.#ctx = ctx;
    this.#io = io;
    this.#header = header;
    this.#uuid = header.uuid;
    this.#release = release;
    this.#ready = initial !== null;
    this.#space = new RingSpace(ringBytesOf(header.size), 0, 0, 0);
    // an existing log's checkpoint is read by recover(); until then nothing uses this one
    this.#slots = new CheckpointSlots(io, header.uuid, initial ?? initialCheckpoint(0));
    const log = this;
    this.#access = {
      uuid: header.uuid,
      io,
      cache: this.#cache,
      get ringBytes() {
        return log.#space.ringBytes;
      },
      get tail() {
        return log.#tailSeq;
      },
      get head() {
        return log.#written;
      },
      get moves() {
        return log.#moves;
      },
      locate: (seq) => this.#locate(seq),
    };
  }

  get uuid(): string {
    return this.#uuid.toString('hex');
  }
  get size(): number {
    return this.#header.size;
  }
  get head(): number {
    return this.#written;
  }
  get tail(): number {
    return this.#tailSeq;
  }
  used(): number {
    return this.#space.usedBytes / 512;
  }

  async recover(): Promise<Recovered> {
    this.#usable('open');
    if (this.#appended) {
      throw new BlockError('EINVAL', 'ringbuffer: recover() must come before any append');
    }
    const cp = newestCheckpoint(await this.#io.readSlots(), this.#uuid);
    const where = `ringbuffer: ${this.#io.ref} at sector ${this.#io.devStart}`;
    if (!cp) throw new BlockError('EIO', `${where}: no valid checkpoint (both slots torn or corrupt)`);
    const ring = ringBytesOf(this.#header.size);
    if (cp.tailOffset > ring - ENTRY_HEADER_BYTES) {
      throw new BlockError('EIO', `${where}: checkpoint names ring offset ${cp.tailOffset}, beyond the ring (${ring} bytes)`);
    }
    this.#hints.clear();
    this.#cache.clear();
    this.#images.clear();
    const scan = await scanRing(this.#io, this.#uuid, ring, cp, {
      hint: (p) => this.#hints.add(p.seq, p.off, p.prevCrc), hintStride: hintStride(ring),
    });
    this.#slots = new CheckpointSlots(this.#io, this.#uuid, cp);
    this.#space = new RingSpace(ring, cp.tailOffset, scan.headOffset, scan.usedBytes);
    this.#tailSeq = cp.tailSeq;
    this.#tailPrevCrc = cp.tailPrevCrc;
    this.#written = scan.head;
    this.#nextSeq = scan.head + 1;
    this.#lastCrc = scan.lastCrc;
    this.#ready = true;
    if (scan.tornTail) this.#ctx.log.info(`${this.#ctx.device}: ${where}: discarded a torn entry ${scan.head + 1} after the last valid one`);
    return { state: this.#slots.state, head: scan.head, entries: scan.entries, tornTail: scan.tornTail };
  }

  append(e: AppendEntry): Promise<number> {
    if (this.#deferred) return new Promise((resolve, reject) => this.#deferred!.push({ e, resolve, reject }));
    try {
      this.#usable('append');
      checkEntry(e);
    } catch (err) {
      return Promise.reject(err);
    }
    const payload = e.op === 'write' ? e.data : EMPTY;
    const bytes = entryBytes(payload.length);
    const space = this.#space;
    if (bytes > space.maxEntryBytes) {
      return Promise.reject(new BlockError('EINVAL', `ringbuffer: an entry of ${bytes} bytes can never fit: at most ${space.maxEntryBytes} (half the ring)`));
    }
    const off = space.take(bytes);
    if (off < 0) {
      return Promise.reject(new BlockError('ENOSPC', `ringbuffer: ring full (${this.used()}/${this.size} sectors used, the entry needs ${bytes / 512})`));
    }
    const seq = this.#nextSeq++;
    this.#appended = true;
    const prevCrc = this.#lastCrc;
    const time = Date.now();
    const fields = {
      op: e.op, fua: e.fua, devNr: e.devNr, payloadBytes: payload.length, seq, epoch: e.epoch, sector: e.sector,
      sectors: e.sectors, time, prevCrc,
    };
    const small = payload.length < BIG_PAYLOAD;
    const image = small ? this.#images.take(bytes) : ioBuffer(ENTRY_HEADER_BYTES);
    encodeEntryHeader(image, fields, this.#uuid);
    let data = payload;
    if (small) {
      payload.copy(image, ENTRY_HEADER_BYTES);
      image.fill(0, ENTRY_HEADER_BYTES + payload.length);
      data = image.subarray(ENTRY_HEADER_BYTES, ENTRY_HEADER_BYTES + payload.length);
    }
    const seed = entrySeed(image, 0);
    const crc = sealEntryFrom(image, 0, seed, data);
    const entry: ReplogEntry | null = small
      ? { seq, time, devNr: e.devNr, op: e.op, sector: e.sector, sectors: e.sectors, epoch: e.epoch, fua: e.fua, data, payloadCrc: { seed, crc } }
      : null;
    this.#lastCrc = crc;
    const marker = space.marker;
    const slot: Slot = {
      seq, off, bytes, crc, prevCrc, entry, cost: small ? bytes : 0, writes: (marker < 0 ? 0 : 1) + (small ? 1 : 2),
      resolve: null, reject: null,
    };
    const done = new Promise<number>((resolve, reject) => {
      slot.resolve = resolve;
      slot.reject = reject;
    });
    this.#cache.push(slot);
    if (small) this.#images.retain(seq, image, this.#space.ringBytes);
    this.#sample(slot);
    if (marker >= 0) this.#write(slot, marker, encodeWrapMarker(seq, this.#uuid));
    if (small) this.#write(slot, off, image);
    else {
      this.#write(slot, off, image);
      this.#write(slot, off + ENTRY_HEADER_BYTES, payload);
    }
    return done;
  }

  /**
   * Queue a ring write of `slot`; the queue goes out once the appends of this burst are made
   * (process.nextTick: after the microtasks that are running, so the appends of writers
   * resumed together go out together).
   */
  #write(slot: Slot, off: number, buf: Buffer): void {
    if (this.#queue.push(slot, off, buf)) process.nextTick(this.#flushQueue);
  }

  /**
   * The queued writes, those of neighbouring images at neighbouring ring offsets as one
   * write each; the writes a joined one replaces count toward the log device's limit of
   * synchronous calls per turn of the event loop as before, so timers and sockets get their
   * turns as often as when every append was a write.
   */
  readonly #flushQueue = (): void => {
    this.#queue.drain((off, buf, slots) => {
      if (slots.length > 1) this.#io.dev.chargeSyncTurn?.(slots.length - 1);
      this.#io.writeRing(off, buf).then(() => {
        for (const s of slots) this.#wrote(s);
      }, (err: unknown) => this.#fail(err));
    });
  };

  /** one write of `slot` completed: settle every append that is now written in order */
  #wrote(slot: Slot): void {
    if (--slot.writes > 0 || this.#failed) return;
    for (let s = this.#cache.get(this.#written + 1); s && s.writes === 0 && s.resolve; s = this.#cache.get(this.#written + 1)) {
      this.#written = s.seq;
      const resolve = s.resolve;
      s.resolve = null;
      s.reject = null;
      resolve(s.seq);
    }
    this.#cache.trim(this.#written, this.#tailSeq);
  }

  #fail(err: unknown): void {
    if (this.#failed) return;
    const msg = `ringbuffer: ${this.#io.ref}: a log write failed: ${(err as Error).message}`;
    this.#failed = new BlockError('EIO', msg, { cause: err });
    for (const s of this.#cache.from(this.#written + 1)) {
      const reject = s.reject;
      s.resolve = null;
      s.reject = null;
      reject?.(this.#failed);
    }
    this.#ctx.log.warn(`${this.#ctx.device}: ${msg}; the log refuses appends until it is reloaded`);
    this.#ctx.event();
  }

  reclaim(belowSeq: number): void {
    this.#images.reclaim(Math.min(belowSeq, this.#tailSeq));
  }

  /** keep a position sample every 1/128 of the ring */
  #sample(slot: Slot): void {
    if (this.#sinceHint >= hintStride(this.#space.ringBytes)) {
      this.#hints.add(slot.seq, slot.off, slot.prevCrc);
      this.#sinceHint = 0;
    }
    this.#sinceHint += slot.bytes;
  }

  flush(): Promise<void> {
    if (this.#closed) return Promise.reject(closedError());
    return this.#io.flush().catch((err: unknown) => {
      const e = toBlockError(err);
      this.#ctx.log.warn(`${this.#ctx.device}: ringbuffer: ${this.#io.ref}: flush failed: ${e.message}`);
      throw e;
    });
  }

  heldHere(): boolean {
    return heldHere(this.#io.dev);
  }

  reader(fromSeq: number): ReplogReader {
    this.#usable('ready');
    if (!Number.isSafeInteger(fromSeq) || fromSeq > this.#written + 1) {
      throw new BlockError('EINVAL', `ringbuffer: reader from ${fromSeq}: beyond the head ${this.#written}`);
    }
    if (fromSeq < this.#tailSeq) throw overflow(this.#access, fromSeq);
    return new RingReader(this.#access, fromSeq);
  }

  /** the position of entry `seq`, tail ≤ seq ≤ next to be appended */
  #locate(seq: number): Promise<Position> {
    if (seq < this.#tailSeq) return Promise.reject(overflow(this.#access, seq));
    if (seq === this.#tailSeq) return Promise.resolve({ seq, off: this.#space.tailOffset, prevCrc: this.#tailPrevCrc });
    if (seq === this.#nextSeq) return Promise.resolve({ seq, off: this.#space.headOffset, prevCrc: this.#lastCrc });
    const slot = this.#cache.get(seq);
    if (slot) return Promise.resolve({ seq, off: slot.off, prevCrc: slot.prevCrc });
    const from = this.#hints.before(seq, this.#tailSeq) ?? { seq: this.#tailSeq, off: this.#space.tailOffset, prevCrc: this.#tailPrevCrc };
    return walkTo(this.#access, from, seq);
  }

  checkpoint(state: CheckpointState): Promise<void> {
    return this.#serialise(async () => {
      this.#usable('ready');
      checkState(state, this.#written);
      const frozen = copyState(state);
      const pos = await this.#locate(Math.max(this.#tailSeq, oldestNeeded(frozen)));
      await this.#writeCheckpoint(frozen, pos);
      if (pos.seq === this.#tailSeq) return;
      this.#space.release(pos.off, pos.seq === this.#nextSeq);
      this.#tailSeq = pos.seq;
      this.#tailPrevCrc = pos.prevCrc;
      this.#cache.trim(this.#written, this.#tailSeq);
    });
  }

  async #writeCheckpoint(state: CheckpointState | null, tail: Position): Promise<void> {
    try {
      await this.#slots.write(state, tail);
    } catch (err) {
      const e = toBlockError(err);
      this.#ctx.log.warn(`${this.#ctx.device}: ringbuffer: ${this.#io.ref}: checkpoint write failed: ${e.message}`);
      this.#ctx.event();
      throw e;
    }
  }

  resize(sectors: number): Promise<void> {
    return this.#serialise(async () => {
      this.#usable('ready');
      const ref = this.#io.ref;
      const start = this.#io.devStart;
      if (!Number.isSafeInteger(sectors) || sectors < MIN_LOG_SECTORS) {
        throw new BlockError('EINVAL', `ringbuffer: invalid size ${sectors} (at least ${MIN_LOG_SECTORS} sectors: 2 MiB)`);
      }
      if (start + sectors > this.#io.dev.sectors) {
        throw new BlockError('EINVAL', `ringbuffer: device too small for replog: ${ref} has ${this.#io.dev.sectors} sectors, needs ${start + sectors} (dev_start ${start} + size ${sectors})`);
      }
      if (sectors === this.#header.size) return;
      const ring = ringBytesOf(sectors);
      const space = this.#space;
      const empty = this.#tailSeq === this.#nextSeq;
      const fits = space.headOffset <= ring - ENTRY_HEADER_BYTES;
      if (!empty && !space.isLinear()) {
        throw new BlockError('EINVAL', `ringbuffer: cannot resize to ${sectors} sectors: the kept entries ${this.#tailSeq}-${this.#nextSeq - 1} wrap around the end of the ring (resize when it is empty, or once the tail has passed the wrap)`);
      }
      if (!empty && !fits) {
        throw new BlockError('EINVAL', `ringbuffer: cannot shrink to ${sectors} sectors: the kept entries ${this.#tailSeq}-${this.#nextSeq - 1} reach ring byte ${space.headOffset}, the new ring holds ${ring - ENTRY_HEADER_BYTES}`);
      }
      this.#deferred = [];
      try {
        if (!fits) {
          // empty, with the head past the new end: the tail moves to offset 0, checkpointed first
          await this.#writeCheckpoint(null, { seq: this.#tailSeq, off: 0, prevCrc: this.#tailPrevCrc });
          space.resize(space.ringBytes, 0);
          this.#moves++;
        }
        const header = { ...this.#header, size: sectors };
        await this.#io.writeHeader(header);
        this.#header = header;
        space.resize(ring, null);
      } finally {
        const waiting = this.#deferred ?? []; // destroy() may have refused them already
        this.#deferred = null;
        for (const d of waiting) this.append(d.e).then(d.resolve, d.reject);
      }
    });
  }

  #serialise(fn: () => Promise<void>): Promise<void> {
    const run = this.#serial.then(fn);
    this.#serial = run.then(noop, noop);
    return run;
  }

  /**
   * Throws unless the log may be used now: `open` (not destroyed), `ready` (and recovered,
   * or newly created), `append` (and not failed).
   */
  #usable(need: 'open' | 'ready' | 'append'): void {
    if (this.#closed) throw closedError();
    if (need === 'open') return;
    if (!this.#ready) throw new BlockError('EINVAL', 'ringbuffer: recover() must read the log before it is used');
    if (need === 'append' && this.#failed) throw this.#failed;
  }

  status(type: StatusType): string {
    if (type === 'info') return `${this.used()}/${this.size}`;
    return `${escapeArg(this.#io.ref)} ${this.#io.devStart} open ${this.size}`;
  }

  destroy(): Promise<void> {
    if (!this.#closed) {
      this.#flushQueue(); // the appends made issue their writes, as when they were issued at once
      this.#closed = true;
      this.#images.clear();
      this.#release();
      const waiting = this.#deferred ?? [];
      this.#deferred = null;
      for (const d of waiting) d.reject(closedError());
    }
    return Promise.resolve();
  }
}

function closedError(): BlockError {
  return new BlockError('ESHUTDOWN', 'ringbuffer: the log was destroyed');
}

/** an entry the log can record, or a BlockError EINVAL naming the bad field */
function checkEntry(e: AppendEntry): void {
  const bad = (why: string): never => {
    throw new BlockError('EINVAL', `ringbuffer: invalid entry: ${why}`);
  };
  if (!OPS.has(e.op)) bad(`op '${String(e.op)}'`);
  if (!Number.isInteger(e.devNr) || e.devNr < 0 || e.devNr > 255) bad(`devNr ${e.devNr} (0 to 255)`);
  if (!isCount(e.sector)) bad(`sector ${e.sector}`);
  if (!isCount(e.sectors)) bad(`sectors ${e.sectors}`);
  if (!isCount(e.epoch)) bad(`epoch ${e.epoch}`);
  if (e.op === 'write' && e.data.length !== e.sectors * 512) bad(`write of ${e.sectors} sectors with ${e.data.length} bytes of data`);
}

function isCount(n: number): boolean {
  return Number.isSafeInteger(n) && n >= 0;
}

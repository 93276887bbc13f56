/**
 * Connection threads (docs/nbd.md): after the handshake, a plain connection whose export maps
 * straight onto files (`linear` over an image) moves to one of a few worker threads, which
 * read requests from the socket, do the file I/O themselves and reply. One thread cannot
 * copy nbdcopy's four streams through the page cache and the socket as fast as nbdkit's
 * threads do; with the copies spread over threads it can.
 *
 * The engine stays on the main thread. The connection keeps its export handle open here (the
 * device's open count), and the thread forwards to it everything that is not a plain read or
 * write of the file ranges: FLUSH (also done on the thread's own descriptors), TRIM,
 * WRITE_ZEROES, BLOCK_STATUS, and every request while the device is suspended or its table
 * has no file ranges. Suspend stops the thread's file I/O through a lease in shared memory
 * (file-ranges.ts) and waits for it; resume hands over the new table's ranges.
 *
 * A connection moves by its file descriptor: the main thread duplicates it (fcntl
 * F_DUPFD_CLOEXEC), stops reading, passes the duplicate and any bytes read past the
 * handshake, and closes its own. TLS connections stay on the main thread.
 */
import { availableParallelism } from 'node:os';
import type { Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import { Worker } from 'node:worker_threads';
import { dupFd } from '../core/file-dev.ts';
import { claimWriter, newSlab, releaseWriter } from '../core/io-stats.ts';
import type { Logger } from '../core/log.ts';
import type { Extent } from '../core/types.ts';
import type { ExportHandle, ExportInfo, FileRange } from './export.ts';
import { abandon, closeFd, closeRanges, GEN, newLease, revoke } from './file-ranges.ts';

/** default number of connection threads: one per CPU, at most this many */
const THREADS_MAX = 4;

export function defaultThreads(): number {
  return Math.min(THREADS_MAX, availableParallelism());
}

/** what a connection thread needs to serve like the main thread does */
export interface ThreadOptions {
  maxInFlightBytes: number;
  maxInFlightRequests: number;
  readWindowBytes: number;
  graceMs: number;
  bufferPoolBytes: number;
  directReads: boolean;
}

// ---- messages (main → thread: conn, map, gone, end, io reply; thread → main: io, closed)

export interface ConnMsg {
  t: 'conn';
  c: number;
  fd: number;
  leftover: Uint8Array;
  structured: boolean;
  baseAllocation: boolean;
  info: ExportInfo;
  lease: Int32Array;
  gen: number;
  ranges: FileRange[];
  /** where the thread counts the file I/O it does for this export (src/core/io-stats.ts) */
  io: Float64Array;
}
export interface MapMsg { t: 'map'; c: number; gen: number; ranges: FileRange[] | null }
export interface GoneMsg { t: 'gone' | 'end'; c: number }
export type IoOp = 'read' | 'write' | 'flush' | 'trim' | 'zero' | 'alloc';
export interface IoMsg {
  t: 'io';
  c: number;
  id: number;
  op: IoOp;
  off: number;
  len: number;
  fua: boolean;
  noHole: boolean;
  data?: Uint8Array;
}
export interface IoReply {
  t: 'io';
  c: number;
  id: number;
  err?: { code: string; message: string };
  data?: Uint8Array;
  extents?: Extent[];
}
/** the thread took the connection's descriptor (from then on it closes it) / is done with it */
export interface ClosedMsg { t: 'adopted' | 'closed'; c: number }
/** range descriptors the thread no longer uses: the main thread closes them */
export interface ReleaseMsg { t: 'release'; fds: number[] }
export type ToThread = ConnMsg | MapMsg | GoneMsg | IoReply;
export type FromThread = IoMsg | ClosedMsg | ReleaseMsg;

/** a connection served on a thread, as the server sees it */
export interface HandedOff {
  end(reason: string): void;
  readonly done: Promise<void>;
}

interface Slot {
  worker: Worker;
  conns: Set<Handed>;
  /** the thread has taken a connection (it started properly) */
  adopted: boolean;
  /** range descriptors handed to the thread and not released yet: closed here if it dies */
  fds: Set<number>;
  /** the thread's number for I/O statistics slabs (io-stats.ts claimWriter) */
  writer: number;
}

interface Handed extends HandedOff {
  id: number;
  /** the duplicated descriptor, ours to close until the thread says it adopted it */
  fd: number;
  adopted: boolean;
  slot: Slot;
  handle: ExportHandle;
  lease: Int32Array;
  detach(): void;
  finish(): void;
}

interface SocketInternals {
  _handle?: { fd?: number; readStop?: () => number; reading?: boolean } | null;
}

export class ConnThreads {
  readonly #count: number;
  readonly #opts: ThreadOptions;
  readonly #log: Logger;
  readonly #slots: Slot[] = [];
  readonly #conns = new Map<number, Handed>();
  #nextId = 1;
  #nextGen = 1;
  #closed = false;
  /** threads could not start: serve everything on the main thread */
  #disabled = false;
  #forwarded = 0;

  readonly #entry: URL;

  constructor(count: number, opts: ThreadOptions, log: Logger, entry = new URL('./conn-worker-entry.mjs', import.meta.url)) {
    this.#entry = entry;
    this.#count = count;
    this.#opts = opts;
    this.#log = log;
  }

  /** requests the threads passed to the main thread (not plain file I/O, or no file ranges then) */
  get forwarded(): number {
    return this.#forwarded;
  }

  /** start the threads now (else at the first connection that moves) */
  prestart(): void {
    while (!this.#closed && this.#slots.length < this.#count) this.#spawn();
  }

  /**
   * Move a connection that finished its handshake to a thread. Null when it stays here: TLS,
   * an export without file ranges (now), or a socket Node's internals do not let us move.
   * Must be called before the socket's next read event (right after the handshake resolved).
   */
  take(session: { socket: Socket; leftover: Buffer; handle: ExportHandle; structured: boolean; baseAllocation: boolean }): HandedOff | null {
    const { socket, handle } = session;
    if (this.#closed || this.#disabled || this.#count === 0 || !handle.bypass || socket instanceof TLSSocket) return null;
    const h = (socket as unknown as SocketInternals)._handle;
    if (!h || typeof h.fd !== 'number' || h.fd < 0 || typeof h.readStop !== 'function') return null;
    if (socket.readableLength > 0 || socket.writableLength > 0 || socket.destroyed) return null;
    const lease = newLease();
    let rec: Handed | null = null;
    const reg = handle.bypass({
      stop: () => revoke(lease),
      start: (ranges) => {
        if (rec) this.#remap(rec, ranges);
        else closeRanges(ranges);
      },
    });
    if (!reg) return null;
    if (!reg.ranges) {
      reg.detach();
      return null;
    }
    let fd: number;
    try {
      fd = dupFd(h.fd);
    } catch (err) {
      this.#log.debug(`connection stays on the main thread: ${(err as Error).message}`);
      closeRanges(reg.ranges);
      reg.detach();
      return null;
    }
    h.readStop();
    h.reading = false;
    socket.destroy(); // closes only our descriptor: the thread has its own

    const slot = this.#pick();
    const io = reg.ioSlab?.(slot.writer) ?? newSlab();
    let resolve!: () => void;
    const done = new Promise<void>((r) => { resolve = r; });
    const id = this.#nextId++;
    const r: Handed = {
      id, fd, adopted: false, slot, handle, lease, done,
      detach: reg.detach,
      end: (reason: string) => {
        this.#log.debug(`ending threaded connection ${id}: ${reason}`);
        this.#post(slot, { t: 'end', c: id });
      },
      finish: () => {
        if (!this.#conns.delete(id)) return;
        slot.conns.delete(r);
        r.detach();
        try {
          handle.close();
        } catch (err) {
          this.#log.warn(`closing export handle: ${(err as Error).message}`);
        }
        resolve();
      },
    };
    rec = r;
    this.#conns.set(id, r);
    slot.conns.add(r);
    const gen = this.#nextGen++;
    Atomics.store(lease, GEN, gen);
    this.#lend(slot, reg.ranges);
    this.#post(slot, {
      t: 'conn', c: id, fd, leftover: new Uint8Array(session.leftover), structured: session.structured,
      baseAllocation: session.baseAllocation, info: handle.info, lease, gen, ranges: reg.ranges, io,
    });
    handle.onGone(() => this.#post(slot, { t: 'gone', c: id }));
    return r;
  }

  /**
   * End every connection (they finish as the server's own do: in-flight requests get the
   * grace period) and stop the threads. A thread that has not let its connections finish by
   * twice the grace period (blocked in a file call on a dead disk) is terminated regardless.
   */
  async close(): Promise<void> {
    this.#closed = true;
    for (const r of this.#conns.values()) r.end('server closing');
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      Promise.all([...this.#conns.values()].map((r) => r.done)),
      new Promise<void>((resolve) => { timer = setTimeout(resolve, 2 * this.#opts.graceMs); }),
    ]);
    clearTimeout(timer);
    const slots = [...this.#slots];
    await Promise.all(slots.map((s) => s.worker.terminate()));
  }

  #spawn(): Slot {
    const worker = new Worker(this.#entry, { workerData: this.#opts, trackUnmanagedFds: false });
    worker.unref();
    const slot: Slot = { worker, conns: new Set(), adopted: false, fds: new Set(), writer: claimWriter() };
    worker.on('message', (m: FromThread) => this.#onMessage(slot, m));
    worker.on('error', (err) => this.#log.error(`connection thread failed: ${err.stack ?? err.message}`));
    worker.on('exit', () => this.#lost(slot));
    this.#slots.push(slot);
    return slot;
  }

  /** the thread with the fewest connections (a new one while there are fewer than #count) */
  #pick(): Slot {
    if (this.#slots.length < this.#count) return this.#spawn();
    let best = this.#slots[0]!;
    for (const s of this.#slots) if (s.conns.size < best.conns.size) best = s;
    return best;
  }

  /** `ranges`' descriptors go to the thread until it releases them (or dies) */
  #lend(slot: Slot, ranges: readonly FileRange[] | null): void {
    for (const r of ranges ?? []) slot.fds.add(r.fd);
  }

  /** close descriptors the thread no longer uses (only ones lent to it: each exactly once) */
  #release(slot: Slot, fds: readonly number[]): void {
    for (const fd of fds) if (slot.fds.delete(fd)) closeFd(fd);
  }

  #post(slot: Slot, m: ToThread, transfer?: ArrayBuffer[]): void {
    try {
      slot.worker.postMessage(m, transfer);
    } catch (err) {
      this.#log.warn(`connection thread message: ${(err as Error).message}`);
    }
  }

  /** the device resumed: the thread uses `ranges` (or none) from now on */
  #remap(r: Handed, ranges: FileRange[] | null): void {
    if (!this.#conns.has(r.id)) {
      closeRanges(ranges);
      return;
    }
    const gen = ranges ? this.#nextGen++ : 0;
    this.#lend(r.slot, ranges);
    this.#post(r.slot, { t: 'map', c: r.id, gen, ranges });
    if (gen) Atomics.store(r.lease, GEN, gen);
  }

  /**
   * A thread exited (terminated, or crashed): its connections are gone with it. Descriptors
   * it had not adopted yet are closed here (their clients see the connection close); the
   * ones it had were closed with its handles. A thread that exits before taking any
   * connection could not start (e.g. a broken install): connections then stay on the main
   * thread.
   */
  #lost(slot: Slot): void {
    const i = this.#slots.indexOf(slot);
    if (i >= 0) this.#slots.splice(i, 1);
    releaseWriter(slot.writer); // it writes no slab any more: the next thread may carry on in them
    for (const r of [...slot.conns]) {
      if (!r.adopted) closeFd(r.fd);
      abandon(r.lease);
      r.finish();
    }
    this.#release(slot, [...slot.fds]);
    if (!slot.adopted && !this.#closed && !this.#disabled) {
      this.#disabled = true;
      this.#log.error('a connection thread exited before serving: NBD connections stay on the main thread');
    }
  }

  #onMessage(slot: Slot, m: FromThread): void {
    if (m.t === 'release') return this.#release(slot, m.fds);
    const r = this.#conns.get(m.c);
    if (!r) return;
    if (m.t === 'io') this.#io(r, m);
    else if (m.t === 'closed') r.finish();
    else {
      r.adopted = true;
      slot.adopted = true;
    }
  }

  /** a request the thread does not serve itself: run it on the export handle here */
  #io(r: Handed, m: IoMsg): void {
    this.#forwarded++;
    const h = r.handle;
    let out: Buffer | undefined;
    let p: Promise<void | Extent[]>;
    try {
      switch (m.op) {
        case 'read':
          out = Buffer.allocUnsafeSlow(m.len);
          p = h.read(out, m.off);
          break;
        case 'write':
          p = h.write(Buffer.from(m.data!.buffer, m.data!.byteOffset, m.data!.byteLength), m.off, m.fua);
          break;
        case 'flush':
          p = h.flush();
          break;
        case 'trim':
          p = h.trim(m.off, m.len, m.fua);
          break;
        case 'zero':
          p = h.writeZeroes(m.off, m.len, { fua: m.fua, noHole: m.noHole });
          break;
        case 'alloc':
          p = h.allocation(m.off, m.len);
          break;
      }
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then((v) => {
      if (out) this.#post(r.slot, { t: 'io', c: m.c, id: m.id, data: out }, [out.buffer as ArrayBuffer]);
      else this.#post(r.slot, { t: 'io', c: m.c, id: m.id, extents: Array.isArray(v) ? v : undefined });
    }, (err: unknown) => {
      const e = err as { code?: unknown; message?: unknown } | null;
      this.#post(r.slot, {
        t: 'io', c: m.c, id: m.id,
        err: { code: typeof e?.code === 'string' ? e.code : 'EIO', message: typeof e?.message === 'string' ? e.message : 'I/O error' },
      });
    });
  }
}

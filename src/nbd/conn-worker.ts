/**
 * A connection thread (conn-threads.ts): serves the connections the main thread moves here
 * with the same Transmission loop, over a ThreadExport that reads and writes the export's
 * file ranges itself while the lease allows, and forwards everything else to the main thread.
 */
import { Socket } from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';
import { FileDev, SYNC_DONE } from '../core/file-dev.ts';
import { IoMeter, OP_INDEX, type Timed } from '../core/io-stats.ts';
import { log } from '../core/log.ts';
import type { Extent } from '../core/types.ts';
import { BufferPool } from './buffer-pool.ts';
import type { ConnMsg, FromThread, IoOp, IoReply, ThreadOptions, ToThread } from './conn-threads.ts';
import type { ExportHandle, ExportInfo, FileRange } from './export.ts';
import { closeFd, enter, leave } from './file-ranges.ts';
import { Transmission, type TransmissionOptions } from './transmission.ts';

const port = parentPort!;
const cfg = workerData as ThreadOptions;
const logger = log('nbd');
const txOpts: TransmissionOptions = {
  maxInFlightBytes: cfg.maxInFlightBytes,
  maxInFlightRequests: cfg.maxInFlightRequests,
  readWindowBytes: cfg.readWindowBytes,
  graceMs: cfg.graceMs,
  pool: new BufferPool(cfg.bufferPoolBytes),
  directReads: cfg.directReads,
  log: logger,
};

function send(m: FromThread, transfer?: ArrayBuffer[]): void {
  port.postMessage(m, transfer);
}

/**
 * Range descriptors are the main thread's: this thread hands them back when done with them
 * and never closes one itself, so none is closed twice (a number closed here could belong to
 * another file by the time the main thread closed it after this thread died) and none leaks.
 */
function release(fds: number[]): void {
  if (fds.length > 0) send({ t: 'release', fds });
}

function rangeFds(ranges: readonly FileRange[] | null): number[] {
  return (ranges ?? []).map((r) => r.fd);
}

/** one file range, open on this thread */
interface Span {
  start: number;
  end: number;
  /** file byte = export byte + delta */
  delta: number;
  dev: FileDev;
}

interface Pending {
  resolve: (v: Extent[] | undefined) => void;
  reject: (err: unknown) => void;
  /** READ: where the data goes */
  buf?: Buffer;
}

class ThreadExport implements ExportHandle {
  readonly info: ExportInfo;
  readonly #c: number;
  readonly #lease: Int32Array;
  #gen = 0;
  #spans: Span[] = [];
  /** flushes of the files of earlier ranges (closed once flushed): the next FLUSH waits for them */
  #retired: Promise<void>[] = [];
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #gone: Array<() => void> = [];
  #closed = false;
  /** counts the file I/O done here in the device's slab for this thread; each completion leaves the lease */
  readonly #meter: IoMeter;

  constructor(m: ConnMsg) {
    this.info = m.info;
    this.#c = m.c;
    this.#lease = m.lease;
    const lease = m.lease;
    this.#meter = new IoMeter(m.io, () => leave(lease));
    this.remap(m.gen, m.ranges);
  }

  /** ranges of generation `gen` from now on (the old ones are idle: the lease was revoked) */
  remap(gen: number, ranges: FileRange[] | null): void {
    for (const s of this.#spans) this.#retire(s.dev);
    this.#spans = [];
    if (this.#closed) {
      release(rangeFds(ranges));
      return;
    }
    for (const r of ranges ?? []) {
      const dev = FileDev.adopt(r.ref, r.path, { fd: r.fd, state: r.state }, r.fileSectors, { readOnly: r.readOnly });
      this.#spans.push({ start: r.start, end: r.start + r.length, delta: r.offset - r.start, dev });
    }
    this.#gen = gen;
  }

  /**
   * A reload may drop a file from the table, and the main thread then no longer flushes it:
   * what this connection wrote there is made durable now, and a FLUSH waits for that.
   */
  #retire(dev: FileDev): void {
    const p = dev.flush().finally(() => release([dev.detach()]));
    p.catch(noValue); // reported by the next FLUSH, which awaits `p` itself
    this.#retired.push(p);
  }

  /** the span serving [off, off+len) if the lease allows file I/O now (then leave() after it) */
  #span(off: number, len: number, write: boolean): Span | null {
    if (!enter(this.#lease, this.#gen)) return null;
    for (const s of this.#spans) {
      if (off >= s.start && off + len <= s.end && !(write && s.dev.readOnly)) return s;
    }
    leave(this.#lease);
    return null;
  }

  read(buf: Buffer, offset: number): Promise<void> {
    const s = this.#span(offset, buf.length, false);
    if (!s) return this.#forward('read', offset, buf.length, false, false, buf).then(noValue);
    const t = this.#meter.start(READ, buf.length);
    return this.#left(t, s.dev.readAt(buf, offset + s.delta));
  }

  write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    const s = this.#span(offset, buf.length, true);
    if (!s) return this.#forward('write', offset, buf.length, fua, false, buf).then(noValue);
    const t = this.#meter.start(WRITE, buf.length);
    return this.#left(t, s.dev.writeAt(buf, offset + s.delta, fua));
  }

  /** count file I/O `p` and leave the lease when it is over (at once if it completed synchronously) */
  #left(t: Timed, p: Promise<void>): Promise<void> {
    if (p !== SYNC_DONE) return p.then(t.ok, t.fail);
    t.ok();
    return p;
  }

  /** this thread's writes (and other threads' to the same files: shared flush state), and the main thread's */
  flush(): Promise<void> {
    const parts: Promise<unknown>[] = this.#retired.splice(0);
    for (const s of this.#spans) parts.push(s.dev.flush());
    parts.push(this.#forward('flush', 0, 0, false, false));
    return Promise.all(parts).then(noValue);
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.#forward('trim', offset, length, fua, false).then(noValue);
  }

  writeZeroes(offset: number, length: number, opts: { fua: boolean; noHole: boolean }): Promise<void> {
    return this.#forward('zero', offset, length, opts.fua, opts.noHole).then(noValue);
  }

  allocation(offset: number, length: number): Promise<Extent[]> {
    return this.#forward('alloc', offset, length, false, false).then((x) => x ?? [{ sectors: Math.ceil(length / 512), state: 'data' }]);
  }

  #forward(op: IoOp, off: number, len: number, fua: boolean, noHole: boolean, buf?: Buffer): Promise<Extent[] | undefined> {
    const id = this.#nextId++;
    let data: Uint8Array | undefined;
    if (op === 'write') data = new Uint8Array(buf!); // a copy of its own, to transfer
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, buf: op === 'read' ? buf : undefined });
      send({ t: 'io', c: this.#c, id, op, off, len, fua, noHole, data }, data ? [data.buffer as ArrayBuffer] : undefined);
    });
  }

  reply(m: IoReply): void {
    const p = this.#pending.get(m.id);
    if (!p) return;
    this.#pending.delete(m.id);
    if (m.err) p.reject(Object.assign(new Error(m.err.message), { code: m.err.code }));
    else {
      if (p.buf && m.data) p.buf.set(m.data);
      p.resolve(m.extents);
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    // no FLUSH asked for: the data stays in the page cache, as on the main thread
    release(this.#spans.map((s) => s.dev.detach()));
    this.#spans = [];
    this.#gen = 0;
    served.delete(this.#c);
    send({ t: 'closed', c: this.#c });
  }

  onGone(cb: () => void): void {
    this.#gone.push(cb);
  }

  gone(): void {
    const cbs = this.#gone;
    this.#gone = [];
    for (const cb of cbs) cb();
  }
}

function noValue(): void {}

const READ = OP_INDEX.read;
const WRITE = OP_INDEX.write;

interface Served {
  handle: ThreadExport;
  /** null only while the connection is being set up */
  tx: Transmission | null;
}

const served = new Map<number, Served>();

function adopt(m: ConnMsg): void {
  const handle = new ThreadExport(m);
  const entry: Served = { handle, tx: null };
  served.set(m.c, entry);
  let socket: Socket;
  try {
    socket = new Socket({ fd: m.fd, readable: true, writable: true });
  } catch (err) {
    // not a socket Node can wrap: drop the connection (the descriptor is ours to close)
    logger.warn(`connection thread cannot take a connection: ${(err as Error).message}`);
    send({ t: 'adopted', c: m.c }); // first: should this thread die now, the main thread must not close it too
    closeFd(m.fd);
    handle.close();
    return;
  }
  send({ t: 'adopted', c: m.c });
  socket.on('error', (err) => logger.debug(`connection error: ${err.message}`));
  if (typeof socket.setNoDelay === 'function') socket.setNoDelay(true);
  entry.tx = new Transmission({
    socket, leftover: Buffer.from(m.leftover.buffer, m.leftover.byteOffset, m.leftover.byteLength), handle,
    structured: m.structured, baseAllocation: m.baseAllocation,
  }, txOpts);
}

port.on('message', (m: ToThread) => {
  if (m.t === 'conn') return adopt(m);
  const s = served.get(m.c);
  if (!s) {
    if (m.t === 'map') release(rangeFds(m.ranges));
    return;
  }
  switch (m.t) {
    case 'io':
      return s.handle.reply(m);
    case 'map':
      return s.handle.remap(m.gen, m.ranges);
    case 'gone':
      return s.handle.gone();
    case 'end':
      return s.tx?.end('server closing');
  }
});

/**
 * Backing device over an image file or a block device: positional I/O on one shared fd,
 * an exclusive advisory lock (flock) so a second engine cannot open it, fdatasync-based
 * flush of what was written since the last flush, FUA writes through a second descriptor
 * of the same file opened O_DSYNC (only that write's range is made durable, as a FUA bio
 * in the kernel: not every dirty page of the file), SEEK_DATA/SEEK_HOLE allocation map.
 */
import fs from 'node:fs';
import { createRequire } from 'node:module';
import { performance } from 'node:perf_hooks';
import type FsExt from 'fs-ext';
import type { Bio } from './bio.ts';
import { SECTOR_SHIFT } from './bio.ts';
import { BlockError, DmError, toBlockError } from './errors.ts';
import type { BlockDev, Extent, SharedFile } from './types.ts';
import { mergeExtents } from './extents.ts';
import { envCount } from './env.ts';

let fsExt: typeof FsExt | null = null;

/**
 * fs-ext, loaded at first use. Its addon keeps V8 handles in static storage, reset by every
 * load: loaded on a connection thread, the next thread's load after that thread exited
 * aborted the whole process. Only the main thread calls it (open, lock, dup, allocation), so
 * a connection thread, whose FileDevs adopt descriptors and are never locked, never loads it.
 */
function fsx(): typeof FsExt {
  return (fsExt ??= createRequire(import.meta.url)('fs-ext') as typeof FsExt);
}

/**
 * What a request that completed synchronously returns (readAt/writeAt/submit): a caller may
 * compare against it to skip a promise hop.
 */
export const SYNC_DONE: Promise<void> = Promise.resolve();
const RESOLVED = SYNC_DONE;
const SEEK_END = 2;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
/** fcntl(2) F_DUPFD_CLOEXEC (Linux) */
const F_DUPFD_CLOEXEC = 1030;
/** FileDev's shared state cells */
const DIRTY = 0;
const SYNCING = 1;
/** shared source of zeroes for write-zeroes (never written into) */
const ZEROES = Buffer.alloc(1 << 20);

/**
 * Small reads and writes run synchronously on the calling thread while they are fast (page
 * cache hits): the libuv pool round trip (hand-off, thread wake-up, completion wake-up) costs
 * more than a cached 4 KiB pread itself. SYNC_SLOW_RUN calls in a row that take longer than
 * SYNC_SLOW_MS each (cache misses reaching the disk, dirty-page throttling) send the device's
 * I/O back to the pool for SYNC_BACKOFF_MS, so the event loop is never blocked for long or
 * often. One slow call alone does not: on a busy machine a page-cache read is sometimes
 * preempted for a few tenths of a millisecond (measured: 5–11 such calls in 4 s of fio at
 * qd1, which with a back-off on every one kept the device on the pool a quarter of the time).
 * `DMKIT_SYNC_IO=<bytes>` sets the largest synchronous read (0 turns the synchronous path off),
 * `DMKIT_SYNC_WRITE=<bytes>` the largest synchronous write (default four times that: a cached
 * 1 MiB write done here beat the pool's, where concurrent writes queue on the file's lock).
 * A call counts as slow above SYNC_SLOW_MS per SYNC_SLOW_UNIT bytes (a 1 MiB copy takes
 * longer than a 4 KiB one without reaching the disk).
 */
export const SYNC_IO_MAX_DEFAULT = 256 * 1024;
export const SYNC_SLOW_MS = 0.2;
export const SYNC_SLOW_UNIT = 256 * 1024;
export const SYNC_BACKOFF_MS = 100;
export const SYNC_SLOW_RUN = 2;
/**
 * A synchronous request settles its promise without an event-loop turn, so a caller looping
 * `await dev.write(…)` would never let timers or sockets run. After SYNC_BURST synchronous
 * requests of one device without a turn of the event loop, that device's requests go
 * through the pool until the loop has turned; likewise after SYNC_BURST_BYTES (so one turn
 * copies at most a few milliseconds' worth synchronously per device). The budget is per
 * device, not per process: with one budget for all, the devices that ask first in a turn
 * took all of it, and a replicator's site device, written after the log and the local
 * device of the same writes, went to the pool for every write behind the writers' queue
 * there, shipped a third as fast as they wrote and overflowed the ring (R1 at 1 MiB). All
 * devices together still stop at SYNC_TURN_DEVICES bursts' worth in a turn (many devices
 * busy at once: a group with several sites), so a turn stays around ten milliseconds.
 */
export const SYNC_BURST = 128;
export const SYNC_BURST_BYTES = 8 * 1024 * 1024;
export const SYNC_TURN_DEVICES = 4;
/** turns of the event loop in which synchronous I/O ran; a device's burst counts within one */
let syncTurn = 0;
let turnEnding = false;
/** all devices' synchronous requests and bytes in this turn */
let turnRequests = 0;
let turnBytes = 0;
const endTurn = (): void => {
  turnEnding = false;
  syncTurn++;
  turnRequests = 0;
  turnBytes = 0;
};
/** the current turn (its end is scheduled once a device counts in it) */
function currentTurn(): number {
  if (!turnEnding) {
    turnEnding = true;
    setImmediate(endTurn);
  }
  return syncTurn;
}

export interface FileDevOptions {
  readOnly?: boolean;
  /** largest read served synchronously while fast (default DMKIT_SYNC_IO or 256 KiB; 0 = never) */
  syncIoMax?: number;
  /** largest write served synchronously while fast (default DMKIT_SYNC_WRITE or 4 x syncIoMax) */
  syncWriteMax?: number;
  /** SYNC_SLOW_RUN synchronous calls in a row slower than this (ms) send I/O back to the pool (default 0.2) */
  syncSlowMs?: number;
  /** for this long (ms) (default 100) */
  syncBackoffMs?: number;
}

function readAt(fd: number, buf: Buffer, off: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, off, buf.length - off, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function writeAt(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

/** fdatasync(2) of `fd`, as a promise */
export function datasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

/** a new descriptor (close-on-exec) for what `fd` refers to: a file, a socket */
export function dupFd(fd: number): number {
  return fsx().fcntlSync(fd, F_DUPFD_CLOEXEC, 0);
}

/**
 * Whether every write `dev` completed stays held by this machine (its page cache, a disk
 * attached to it) until flushed: a file or block device opened here (FileDev), or a wrapper
 * that forwards to one and says so. A `dm:` or `nbd://` device says no (what is under it, or
 * the server's cache, may be elsewhere): callers that skip flushes on the strength of this
 * (the replicator's checkpoints) keep them for it.
 */
export function heldHere(dev: BlockDev): boolean {
  return dev.heldHere?.() === true;
}

export class FileDev implements BlockDev {
  readonly ref: string;
  readonly path: string;
  readonly sectors: number;
  readonly readOnly: boolean;
  #fd: number;
  /** the same open file reopened O_DSYNC for FUA writes: -1 not yet, -2 not possible (fdatasync instead) */
  #fuaFd = -1;
  /**
   * [DIRTY, SYNCING] in shared memory: written since the last flush, fdatasyncs running. Shared
   * with the FileDevs that adopt a duplicate of this fd on other threads, so a flush on any
   * thread covers writes completed on all of them (NBD's multi-connection flush).
   */
  readonly #state: Int32Array;
  #closed = false;
  /** this FileDev took the flock (open), rather than adopting a duplicate of a locked fd */
  #locked = true;
  /** largest read done synchronously (0: never) */
  readonly #syncMax: number;
  /** largest write done synchronously (0: never) */
  readonly #syncWriteMax: number;
  readonly #syncSlowMs: number;
  readonly #syncBackoffMs: number;
  /** synchronous I/O is off until this time (performance.now() ms) after slow calls */
  #asyncUntil = 0;
  /** slow synchronous calls in a row */
  #slowRun = 0;
  /** this device's synchronous requests and bytes in turn #burstTurn of the event loop */
  #burstTurn = -1;
  #burst = 0;
  #burstBytes = 0;

  private constructor(ref: string, path: string, fd: number, sectors: number, opts: FileDevOptions, state?: Int32Array) {
    this.#state = state ?? new Int32Array(new SharedArrayBuffer(8));
    this.ref = ref;
    this.path = path;
    this.#fd = fd;
    this.sectors = sectors;
    this.readOnly = !!opts.readOnly;
    this.#syncMax = opts.syncIoMax ?? envCount('DMKIT_SYNC_IO', SYNC_IO_MAX_DEFAULT);
    this.#syncWriteMax = opts.syncWriteMax ?? envCount('DMKIT_SYNC_WRITE', 4 * this.#syncMax);
    this.#syncSlowMs = opts.syncSlowMs ?? SYNC_SLOW_MS;
    this.#syncBackoffMs = opts.syncBackoffMs ?? SYNC_BACKOFF_MS;
  }

  /** Open and lock. Errors name the path and say what went wrong. */
  static open(ref: string, path: string, opts: FileDevOptions = {}): FileDev {
    let fd: number;
    try {
      fd = fs.openSync(path, opts.readOnly ? 'r' : 'r+');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? 'EIO';
      throw new DmError(code === 'ENOENT' ? 'ENOENT' : code, `cannot open ${path}: ${(err as Error).message}`);
    }
    try {
      const st = fs.fstatSync(fd);
      let bytes: number;
      if (st.isFile()) bytes = st.size;
      else if (st.isBlockDevice()) bytes = fsx().seekSync(fd, 0, SEEK_END);
      else throw new DmError('EINVAL', `${path} is neither a regular file nor a block device`);
      try {
        fsx().flockSync(fd, 'exnb');
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'EAGAIN' || code === 'EWOULDBLOCK') {
          throw new DmError('EBUSY', `${path} is locked by another engine (exclusive flock held)`);
        }
        throw err;
      }
      return new FileDev(ref, path, fd, Math.floor(bytes / 512), opts);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /**
   * A FileDev over `fd`, a duplicate (dupFd) of another FileDev's descriptor: used by the NBD
   * connection threads to do a device's file I/O themselves. It shares the original's open
   * file (and its flock) and never unlocks it; closing it closes only `fd` (detach() leaves
   * `fd` open, for its owner to close).
   */
  static adopt(ref: string, path: string, share: SharedFile, sectors: number, opts: FileDevOptions = {}): FileDev {
    const d = new FileDev(ref, path, share.fd, sectors, opts, share.state);
    d.#locked = false;
    return d;
  }

  /** a new descriptor for the same open file (close-on-exec, owned by the caller) and the shared flush state */
  share(): SharedFile {
    if (this.#closed) throw new DmError('EBADF', `${this.path} is closed`);
    return { fd: dupFd(this.#fd), state: this.#state };
  }

  /** a file or block device of this machine (BlockDev.heldHere) */
  heldHere(): boolean {
    return true;
  }

  /** read `buf.length` bytes at byte `pos` (no Bio: the connection threads' hot path) */
  readAt(buf: Buffer, pos: number): Promise<void> {
    if (this.#closed) return Promise.reject(new BlockError('EIO', `${this.path} is closed`));
    return this.#read(buf, pos);
  }

  /** write `buf` at byte `pos`, durable before resolving when `fua` */
  writeAt(buf: Buffer, pos: number, fua: boolean): Promise<void> {
    if (this.#closed) return Promise.reject(new BlockError('EIO', `${this.path} is closed`));
    return this.#write(buf, pos, fua);
  }

  submit(bio: Bio): Promise<void> {
    // never touch the fd number after close: it may already belong to another file
    if (this.#closed) return Promise.reject(new BlockError('EIO', `${this.path} is closed`));
    switch (bio.op) {
      case 'read':
        return this.#read(bio.data, bio.sector * 512);
      case 'write':
        return this.#write(bio.data, bio.sector * 512, !!bio.flags.fua);
      case 'flush':
        return this.flush();
      case 'discard':
        // advisory: Node has no fallocate(PUNCH_HOLE); contents stay as they are
        return bio.flags.fua ? this.flush() : Promise.resolve();
      case 'write-zeroes':
        return this.#writeZeroes(bio.sector * 512, bio.sectors << SECTOR_SHIFT, !!bio.flags.fua);
    }
  }

  /**
   * Hot path: one promise per request, settled straight from the fs callback when the read
   * is complete (the common case); short reads continue in #readFrom.
   */
  #read(buf: Buffer, pos: number): Promise<void> {
    const len = buf.length;
    if (len <= this.#syncMax && this.#syncOk(len)) return this.#readSync(buf, pos);
    return new Promise((resolve, reject) => {
      fs.read(this.#fd, buf, 0, len, pos, (err, n) => {
        if (err) reject(toBlockError(err));
        else if (n === len) resolve();
        else if (n === 0) {
          buf.fill(0);
          resolve();
        } else this.#readFrom(buf, n, pos).then(resolve, reject);
      });
    });
  }

  /** synchronous I/O allowed now: not backing off after slow calls, and within this turn's burst */
  #syncOk(bytes: number): boolean {
    return (this.#asyncUntil === 0 || this.#backoffOver()) && this.#takeSyncTurn(1, bytes);
  }

  /** `requests` more synchronous requests of `bytes` in this turn, if this device's burst allows them */
  #takeSyncTurn(requests: number, bytes: number): boolean {
    const turn = currentTurn();
    if (turn !== this.#burstTurn) {
      this.#burstTurn = turn;
      this.#burst = 0;
      this.#burstBytes = 0;
    }
    this.#burst += requests;
    this.#burstBytes += bytes;
    turnRequests += requests;
    turnBytes += bytes;
    return this.#burst <= SYNC_BURST && this.#burstBytes <= SYNC_BURST_BYTES &&
      turnRequests <= SYNC_TURN_DEVICES * SYNC_BURST && turnBytes <= SYNC_TURN_DEVICES * SYNC_BURST_BYTES;
  }

  /**
   * `n` more requests served in this turn without calls of their own: the replication log
   * writes the entries appended in one burst with one call, and they count toward the turn's
   * limit as the calls they replace did (so the event loop still turns as often).
   */
  chargeSyncTurn(n: number): void {
    this.#takeSyncTurn(n, 0);
  }

  #backoffOver(): boolean {
    if (performance.now() < this.#asyncUntil) return false;
    this.#asyncUntil = 0;
    return true;
  }

  /** after a synchronous call of `bytes` started at t0: back off to the pool after a run of slow ones */
  #timed(t0: number, bytes: number): void {
    const t = performance.now();
    if (t - t0 <= this.#syncSlowMs * Math.max(1, bytes / SYNC_SLOW_UNIT)) this.#slowRun = 0;
    else if (++this.#slowRun >= SYNC_SLOW_RUN) {
      this.#slowRun = 0;
      this.#asyncUntil = t + this.#syncBackoffMs;
    }
  }

  #readSync(buf: Buffer, pos: number): Promise<void> {
    const t0 = performance.now();
    try {
      let done = 0;
      while (done < buf.length) {
        const n = fs.readSync(this.#fd, buf, done, buf.length - done, pos + done);
        if (n === 0) {
          buf.fill(0, done);
          break;
        }
        done += n;
      }
    } catch (err) {
      return Promise.reject(toBlockError(err));
    } finally {
      this.#timed(t0, buf.length);
    }
    return RESOLVED;
  }

  #writeSync(buf: Buffer, pos: number, fua: boolean): Promise<void> {
    const t0 = performance.now();
    try {
      for (let done = 0; done < buf.length; ) done += fs.writeSync(this.#fd, buf, done, buf.length - done, pos + done);
    } catch (err) {
      return Promise.reject(toBlockError(err));
    } finally {
      this.#timed(t0, buf.length);
    }
    Atomics.store(this.#state, DIRTY, 1);
    if (!fua) return RESOLVED;
    return datasync(this.#fd).catch((e: unknown) => {
      throw toBlockError(e);
    });
  }

  /** the rest of a short read: loop until done, zero-fill past the end of the file */
  async #readFrom(buf: Buffer, done: number, pos: number): Promise<void> {
    try {
      while (done < buf.length) {
        const n = await readAt(this.#fd, buf, done, pos + done);
        if (n === 0) {
          buf.fill(0, done);
          return;
        }
        done += n;
      }
    } catch (err) {
      throw toBlockError(err);
    }
  }

  /** Hot path like #read: one promise, settled from the fs callback for a complete write. */
  #write(buf: Buffer, pos: number, fua: boolean): Promise<void> {
    if (this.readOnly) return Promise.reject(new BlockError('EROFS', `${this.path} is open read-only`));
    const len = buf.length;
    if (fua && this.#locked && this.#durableFd() >= 0) return this.#writeFrom(buf, 0, pos, false, this.#fuaFd);
    if (len <= this.#syncWriteMax && this.#syncOk(len)) return this.#writeSync(buf, pos, fua);
    return new Promise((resolve, reject) => {
      fs.write(this.#fd, buf, 0, len, pos, (err, n) => {
        if (err) reject(toBlockError(err));
        else if (n < len) this.#writeFrom(buf, n, pos, fua).then(resolve, reject);
        else {
          Atomics.store(this.#state, DIRTY, 1);
          if (fua) datasync(this.#fd).then(resolve, (e: unknown) => reject(toBlockError(e)));
          else resolve();
        }
      });
    });
  }

  /**
   * A descriptor whose writes are durable when they complete, for FUA: this open file
   * reopened through /proc/self/fd with O_DSYNC, so that the kernel writes back and flushes
   * only the written range (fdatasync would write back every dirty page of the file: at a
   * checkpoint slot of the replication log, the whole ring written since the last flush).
   * -2 (and fdatasync after the write) where that cannot be had: no /proc, no O_DSYNC.
   * Only the FileDev that opened the file has one (an adopted FileDev on a connection thread
   * fdatasyncs instead: a descriptor it opened would outlive a thread that dies).
   */
  #durableFd(): number {
    if (this.#fuaFd !== -1) return this.#fuaFd;
    try {
      if (!fs.constants.O_DSYNC) throw new Error('no O_DSYNC');
      this.#fuaFd = fs.openSync(`/proc/self/fd/${this.#fd}`, fs.constants.O_WRONLY | fs.constants.O_DSYNC);
    } catch {
      this.#fuaFd = -2;
    }
    return this.#fuaFd;
  }

  /** the rest of a short write, or a whole one on `fd` (the O_DSYNC descriptor: durable, the file not made dirty) */
  async #writeFrom(buf: Buffer, done: number, pos: number, fua: boolean, fd = this.#fd): Promise<void> {
    try {
      while (done < buf.length) done += await writeAt(fd, buf, done, buf.length - done, pos + done);
      if (fd !== this.#fd) return;
      Atomics.store(this.#state, DIRTY, 1);
      if (fua) await datasync(this.#fd);
    } catch (err) {
      throw toBlockError(err);
    }
  }

  async #writeZeroes(pos: number, len: number, fua: boolean): Promise<void> {
    if (this.readOnly) throw new BlockError('EROFS', `${this.path} is open read-only`);
    try {
      for (let done = 0; done < len; ) {
        const n = Math.min(ZEROES.length, len - done);
        done += await writeAt(this.#fd, ZEROES, 0, n, pos + done);
      }
      Atomics.store(this.#state, DIRTY, 1);
      if (fua) await datasync(this.#fd);
    } catch (err) {
      throw toBlockError(err);
    }
  }

  /**
   * Durable once every write completed before this call (on any thread sharing the file) is
   * on stable storage: fdatasync when something was written since the last flush, or when
   * another flush's fdatasync is still running (it may have started before those writes).
   */
  flush(): Promise<void> {
    const st = this.#state;
    if (Atomics.exchange(st, DIRTY, 0) === 0 && Atomics.load(st, SYNCING) === 0) return RESOLVED;
    Atomics.add(st, SYNCING, 1);
    return datasync(this.#fd).then(() => {
      Atomics.sub(st, SYNCING, 1);
    }, (err: unknown) => {
      Atomics.sub(st, SYNCING, 1);
      Atomics.store(st, DIRTY, 1);
      throw toBlockError(err);
    });
  }

  async allocation(sector: number, sectors: number): Promise<Extent[]> {
    const out: Extent[] = [];
    const end = (sector + sectors) * 512;
    let pos = sector * 512;
    try {
      while (pos < end) {
        let data: number;
        try {
          data = fsx().seekSync(this.#fd, pos, SEEK_DATA);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'ENXIO') data = end; // hole to EOF
          else throw err;
        }
        data = Math.floor(data / 512) * 512;
        if (data > pos) {
          const holeEnd = Math.min(data, end);
          out.push({ sectors: Math.floor((holeEnd - pos) / 512), state: 'hole' });
          pos = holeEnd;
          if (pos >= end) break;
        }
        const hole = Math.min(fsx().seekSync(this.#fd, pos, SEEK_HOLE), end);
        const alignedHole = Math.max(pos + 512, Math.ceil(hole / 512) * 512);
        out.push({ sectors: (Math.min(alignedHole, end) - pos) / 512, state: 'data' });
        pos = Math.min(alignedHole, end);
      }
    } catch {
      return [{ sectors, state: 'data' }];
    }
    return mergeExtents(out);
  }

  /**
   * Stop using the descriptor without closing it, and return it: an adopted FileDev on a
   * connection thread hands its descriptor back to the thread that gave it, which closes it
   * (so a descriptor is closed exactly once, also when the adopting thread dies).
   */
  detach(): number {
    this.#closed = true;
    this.#closeFua();
    return this.#fd;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#closeFua();
    if (this.#locked) {
      try {
        fsx().flockSync(this.#fd, 'un');
      } catch {
        /* closing releases it anyway */
      }
    }
    fs.closeSync(this.#fd);
  }

  #closeFua(): void {
    if (this.#fuaFd >= 0) fs.closeSync(this.#fuaFd);
    this.#fuaFd = -2;
  }
}

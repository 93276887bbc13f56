/**
 * R1/R3's plain-Node references and the byte-bounded driver (R1 writes a fixed amount per
 * sample, not for a fixed time: the sample ends when the remote site has every byte).
 *
 * R1 reference (`replicaFactory`): what a user-space async replicator must do at least, with
 * the primitives of L1's reference (positional fs.write / fs.writev with callbacks, no
 * promise): per request, append the payload behind a 512-byte header to a log file used as
 * a ring (one writev: header + payload, wrapping at the end of the ring), then write it to
 * the local file and to the remote file (both in parallel); the request completes when all
 * three are written. Options: `checkpoints` (on for the reported reference since the ninth
 * session: the engine's checkpoints and ring-space waits, r-ref-checkpoints.ts: the remote
 * made durable before the ring is reused), `crc` (CRC32C of the payload in the header, as the engine's log does)
 * and `flushMs` (fdatasync the log and the remote file every N ms while it runs): the last
 * two off for the reported reference, for measuring where the engine's time goes.
 *
 * R3 reference (`copyRegions`): copy the given regions local → remote, `concurrency` at a
 * time in chunks of at most `chunk` bytes (fs.read then fs.write, callbacks), then fdatasync
 * the remote file: what a resync of those regions must do at least.
 */
import fs from 'node:fs';
import { crc32c } from '@node-rs/crc32';
import { RefCheckpoints } from './r-ref-checkpoints.ts';
import type { DriveResult, IoFactory, Pattern, Slot } from './workload.ts';
import { rng } from './workload.ts';

/** `n` offsets of pattern `p` over `span` bytes from `seed` (the same generator as workload.ts's drive) */
export function offsets(p: Pattern, span: number, seed: number): () => number {
  const blocks = Math.floor(span / p.bs);
  if (blocks < 1) throw new Error(`span ${span} is smaller than one ${p.bs}-byte block`);
  const random = rng(seed);
  let seq = 0;
  return p.access === 'random'
    ? () => (random() % blocks) * p.bs
    : () => {
        const pos = seq * p.bs;
        seq = seq + 1 === blocks ? 0 : seq + 1;
        return pos;
      };
}

/** Run `ops` requests of pattern `p` over `slots` (`p.qd` in flight); offsets from `seed`. */
export function driveOps(slots: readonly Slot[], p: Pattern, span: number, ops: number, seed: number): Promise<DriveResult> {
  const nextPos = offsets(p, span, seed);
  return new Promise((resolve, reject) => {
    let issued = 0;
    let done = 0;
    let active = 0;
    let failed = false;
    const start = performance.now();
    const finish = (): void => resolve({ ops: done, bytes: done * p.bs, seconds: (performance.now() - start) / 1000 });
    for (const { io } of slots) {
      if (issued >= ops) break;
      active++;
      const step = (err?: unknown): void => {
        if (failed) return;
        if (err) {
          failed = true;
          reject(err);
          return;
        }
        done++;
        if (issued >= ops) {
          if (--active === 0) finish();
          return;
        }
        issued++;
        io(nextPos(), step);
      };
      issued++;
      io(nextPos(), step);
    }
    if (active === 0) finish();
  });
}

export interface ReplicaFiles {
  log: string;
  /** ring bytes of the log file (entries wrap here) */
  logBytes: number;
  local: string;
  remote: string;
  crc: boolean;
  flushMs: number;
  /** engine-like checkpoints (r-ref-checkpoints.ts): the remote fdatasync-ed, then a slot written `O_DSYNC` after the ring */
  checkpoints: boolean;
}

export interface Replica {
  factory: IoFactory;
  /** start / stop the periodic fdatasyncs (flushMs > 0) around a run */
  startRun(): void;
  stopRun(): Promise<void>;
  fds: number[];
  /** checkpoints written since the worker started */
  readonly checkpoints: number;
}

type Cb = (err: NodeJS.ErrnoException | null, n: number) => void;

export function replicaFactory(f: ReplicaFiles): Replica {
  const logFd = fs.openSync(f.log, 'r+');
  const localFd = fs.openSync(f.local, 'r+');
  const remoteFd = fs.openSync(f.remote, 'r+');
  let logPos = 0;
  let seq = 0;
  let timer: NodeJS.Timeout | null = null;
  let syncing: Promise<void> = Promise.resolve();
  const datasync = (fd: number): Promise<void> => new Promise((res, rej) => fs.fdatasync(fd, (e) => (e ? rej(e) : res())));
  const cps = f.checkpoints ? new RefCheckpoints({ ringBytes: f.logBytes, log: f.log, slotsAt: f.logBytes, flushRemote: () => datasync(remoteFd) }) : null;
  const factory: IoFactory = (buf) => {
    const hdr = Buffer.alloc(512);
    const iov = [hdr, buf];
    const need = 512 + buf.length;
    let done: (err?: unknown) => void = () => {};
    let left = 0;
    let failure: unknown;
    let pos = 0;
    const part: Cb = (err, n) => {
      if (err) failure ??= err;
      else if (n !== buf.length) failure ??= new Error(`short write: ${n} of ${buf.length}`);
      if (--left > 0) return;
      cps?.done(need);
      done(failure);
    };
    const logged: Cb = (err, n) => {
      if (err || n !== need) {
        done(err ?? new Error(`short log write: ${n} of ${need}`));
        return;
      }
      left = 2;
      fs.write(localFd, buf, 0, buf.length, pos, part);
      fs.write(remoteFd, buf, 0, buf.length, pos, part);
    };
    const append = (): void => {
      if (logPos + need > f.logBytes) logPos = 0;
      const at = logPos;
      logPos += need;
      cps?.appended(need, ++seq);
      hdr.writeUInt32LE(0x454b4d44, 0);
      hdr.writeDoubleLE(seq, 8);
      hdr.writeDoubleLE(pos, 16);
      hdr.writeUInt32LE(buf.length, 24);
      if (f.crc) hdr.writeUInt32LE(crc32c(buf), 28);
      fs.writev(logFd, iov, at, logged);
    };
    return (p, d) => {
      done = d;
      failure = undefined;
      pos = p;
      if (cps) cps.reserve(need, append);
      else append();
    };
  };
  return {
    factory,
    fds: [logFd, localFd, remoteFd],
    get checkpoints() {
      return cps?.count ?? 0;
    },
    startRun() {
      cps?.start();
      if (f.flushMs <= 0) return;
      timer = setInterval(() => {
        syncing = syncing.then(() => Promise.all([datasync(logFd), datasync(remoteFd)])).then(() => undefined);
      }, f.flushMs);
    },
    async stopRun() {
      if (timer) clearInterval(timer);
      timer = null;
      await syncing;
      await cps?.stop();
    },
  };
}

/**
 * Copy `regions` (region numbers, `regionBytes` each) from `src` to `dst`, `concurrency`
 * regions at a time, in chunks of at most `chunk` bytes; then fdatasync `dst`. Returns seconds.
 */
export async function copyRegions(src: string, dst: string, regions: readonly number[], regionBytes: number, chunk: number, concurrency: number): Promise<number> {
  const sfd = fs.openSync(src, 'r');
  const dfd = fs.openSync(dst, 'r+');
  const t0 = performance.now();
  try {
    let next = 0;
    const worker = async (): Promise<void> => {
      const buf = Buffer.allocUnsafe(Math.min(chunk, regionBytes));
      while (next < regions.length) {
        const base = regions[next++]! * regionBytes;
        for (let off = 0; off < regionBytes; off += buf.length) {
          const len = Math.min(buf.length, regionBytes - off);
          await new Promise<void>((res, rej) => fs.read(sfd, buf, 0, len, base + off, (e, n) => (e ? rej(e) : n === len ? res() : rej(new Error('short read')))));
          await new Promise<void>((res, rej) => fs.write(dfd, buf, 0, len, base + off, (e, n) => (e ? rej(e) : n === len ? res() : rej(new Error('short write')))));
        }
      }
    };
    await Promise.all(Array.from({ length: concurrency }, worker));
    await new Promise<void>((res, rej) => fs.fdatasync(dfd, (e) => (e ? rej(e) : res())));
    return (performance.now() - t0) / 1000;
  } finally {
    fs.closeSync(sfd);
    fs.closeSync(dfd);
  }
}

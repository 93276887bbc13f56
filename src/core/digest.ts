/**
 * Block digests for checksum resync and verify (REPLICATION.md "Resync, verify, seeding"):
 * xxh3-128 of each block, 16 bytes per block, computed on a small pool of worker threads
 * (piscina) so hashing a region never stalls the event loop that carries the I/O.
 *
 * The pool starts with the first digest and is closed by `closeDigestPool` (the engine's
 * close): idle threads are unref'd and leave after DIGEST_IDLE_MS, so they never keep a
 * process alive. The thread (digest-worker.mjs) is plain JavaScript: it runs as it is under tsx and
 * from the built dist/, where tools/build.mjs puts it next to the bundle.
 *
 * The data reaches a thread without a copy: `digestFilled` reads into a buffer over a
 * SharedArrayBuffer, which the thread hashes in place, and keeps it for the next range
 * (a fresh buffer per range was ~1 MiB of garbage per region and side; docs/benchmarks.md R4).
 * Where both sides are read here (a site without digests of its own), `differingData`
 * compares the blocks byte for byte instead of hashing both.
 */
import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';

/** bytes of one block's digest */
export const DIGEST_BYTES = 16;
/** digest threads at most (fewer on a smaller machine): hashing is far faster than the I/O it follows */
const MAX_THREADS = 2;
/**
 * An idle thread leaves after this long: long enough that threads stay warm through a
 * resync or verify (between its regions, passes, the pauses of a paced one) and between
 * runs close together, also at a receiver, which cannot tell when a resync starts or ends.
 * (A thread's start cost ~0.4 s after the 10 s this was before, R4; now ~60 ms, ~250 under
 * tsx when the process has more flags than loaders.)
 */
export const DIGEST_IDLE_MS = 60_000;
/** shared buffers kept for reuse, at most (4 regions in flight × both sides, a receiver's DIGESTs) … */
const MAX_FREE = 8;
/** … and bytes at most */
const MAX_FREE_BYTES = 32 << 20;
/** a buffer's data starts this far into its SharedArrayBuffer (io-buffer.ts: a read into it copies fast) */
const SKIP = 48;

let pool: Piscina | null = null;
/** shared buffers free for the next range; dropped after DIGEST_IDLE_MS unused */
let free: Buffer[] = [];
let trimTimer: NodeJS.Timeout | null = null;

/** node flags that only load code (tsx's loader): a digest thread needs none */
const LOADER_FLAGS = new Set(['--import', '--require', '-r', '--loader', '--experimental-loader']);

/**
 * The threads' node flags: none when the process's are only loaders (under tsx a thread
 * that loads tsx starts in ~250 ms instead of ~60); else inherited (a Worker refuses some
 * flags when they are given to it explicitly, e.g. --max-old-space-size).
 */
function threadExecArgv(): string[] | undefined {
  const a = process.execArgv;
  for (let i = 0; i < a.length; i++) {
    const flag = a[i]!.split('=', 1)[0]!;
    if (!LOADER_FLAGS.has(flag)) return undefined;
    if (!a[i]!.includes('=')) i++; // its value
  }
  return [];
}

function digestPool(): Piscina {
  pool ??= new Piscina({
    filename: new URL('./digest-worker.mjs', import.meta.url).href,
    maxThreads: Math.max(1, Math.min(MAX_THREADS, availableParallelism())),
    minThreads: 0,
    idleTimeout: DIGEST_IDLE_MS,
    execArgv: threadExecArgv(),
  });
  return pool;
}

/** a buffer of `bytes` over a SharedArrayBuffer, a free one when there is one big enough (the smallest) */
function sharedBuffer(bytes: number): Buffer {
  let best = -1;
  for (let i = 0; i < free.length; i++) {
    if (free[i]!.length >= bytes && (best < 0 || free[i]!.length < free[best]!.length)) best = i;
  }
  if (best >= 0) return free.splice(best, 1)[0]!;
  return Buffer.from(new SharedArrayBuffer(bytes + SKIP), SKIP, bytes);
}

/** keep `buf` for a later range (within MAX_FREE and MAX_FREE_BYTES), all of them until DIGEST_IDLE_MS unused */
function giveBack(buf: Buffer): void {
  if (free.length >= MAX_FREE || free.reduce((n, b) => n + b.length, buf.length) > MAX_FREE_BYTES) return;
  free.push(buf);
  if (trimTimer) trimTimer.refresh();
  else (trimTimer = setTimeout(() => ((free = []), (trimTimer = null)), DIGEST_IDLE_MS)).unref();
}

/**
 * The digests of `bytes` bytes that `fill` writes into the buffer it is given (exactly
 * `bytes` long), in blocks of `blockBytes` (the last block may be short): 16 bytes per block,
 * in order. The buffer is shared with the digest thread (no copy) and reused after, so
 * `fill` must be done with it when its promise settles. Rejects with `fill`'s error.
 */
export async function digestFilled(bytes: number, blockBytes: number, fill: (into: Buffer) => Promise<unknown> | void): Promise<Buffer> {
  if (!Number.isSafeInteger(blockBytes) || blockBytes <= 0) throw new RangeError(`digest block size ${blockBytes} is not a positive integer`);
  if (bytes === 0) return Buffer.alloc(0);
  const buf = sharedBuffer(bytes);
  const data = buf.subarray(0, bytes);
  await fill(data); // on an error the buffer is not reused: a read that failed may still be under way
  const out = (await digestPool().run({ data, blockBytes })) as Uint8Array;
  giveBack(buf);
  return Buffer.from(out.buffer, out.byteOffset, out.byteLength);
}

/**
 * The digests of `buf`'s blocks of `blockBytes` (the last block may be short): 16 bytes per
 * block, in order. `buf` is copied for the thread; the caller may reuse it at once.
 */
export function digestBlocks(buf: Buffer, blockBytes: number): Promise<Buffer> {
  return digestFilled(buf.length, blockBytes, (into) => void buf.copy(into));
}

/** indexes of the `size`-byte pieces (the last may be short) that differ between `a` and `b` (same length) */
function differingPieces(a: Buffer, b: Buffer, size: number): number[] {
  const out: number[] = [];
  if (a.equals(b)) return out;
  for (let i = 0, o = 0; o < a.length; i++, o += size) {
    const end = Math.min(a.length, o + size);
    if (a.compare(b, o, end, o, end) !== 0) out.push(i);
  }
  return out;
}

/** indexes of the blocks whose digests differ between `a` and `b` (same length) */
export function differingBlocks(a: Buffer, b: Buffer): number[] {
  if (a.length !== b.length) throw new RangeError(`digest lists of ${a.length} and ${b.length} bytes`);
  return differingPieces(a, b, DIGEST_BYTES);
}

/**
 * Indexes of the blocks of `blockBytes` (the last may be short) that differ between the
 * `bytes` bytes `fillA` and `fillB` write into the buffers they are given, compared byte
 * for byte here: when both sides' data is read here anyway, this is exact and far cheaper
 * than hashing both (a memcmp, ~10 GB/s). Buffers are reused as digestFilled's; rejects
 * with the first fill's error.
 */
export async function differingData(
  bytes: number, blockBytes: number, fillA: (into: Buffer) => Promise<unknown>, fillB: (into: Buffer) => Promise<unknown>,
): Promise<number[]> {
  if (!Number.isSafeInteger(blockBytes) || blockBytes <= 0) throw new RangeError(`block size ${blockBytes} is not a positive integer`);
  if (bytes === 0) return [];
  const a = sharedBuffer(bytes);
  const b = sharedBuffer(bytes);
  await Promise.all([fillA(a.subarray(0, bytes)), fillB(b.subarray(0, bytes))]); // on an error neither is reused
  const out = differingPieces(a.subarray(0, bytes), b.subarray(0, bytes), blockBytes);
  giveBack(a);
  giveBack(b);
  return out;
}

/** Stop the digest threads (the engine is closing). A later digest starts a new pool. */
export async function closeDigestPool(): Promise<void> {
  const p = pool;
  pool = null;
  free = [];
  if (trimTimer) clearTimeout(trimTimer);
  trimTimer = null;
  await p?.destroy();
}

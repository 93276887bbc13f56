/**
 * Block digests for checksum resync and verify (REPLICATION.md "Resync, verify, seeding"):
 * xxh3-128 of each block, 16 bytes per block, computed on a small pool of worker threads
 * (piscina) so hashing a region never stalls the event loop that carries the I/O.
 *
 * The pool starts with the first digest and is closed by `closeDigestPool` (the engine's
 * close): idle threads are unref'd and leave after IDLE_MS, so they never keep a process
 * alive. The thread (digest-worker.mjs) is plain JavaScript: it runs as it is under tsx and
 * from the built dist/, where tools/build.mjs puts it next to the bundle.
 */
import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';

/** bytes of one block's digest */
export const DIGEST_BYTES = 16;
/** digest threads at most (fewer on a smaller machine): hashing is far faster than the I/O it follows */
const MAX_THREADS = 2;
/** an idle thread leaves after this long */
const IDLE_MS = 10_000;

let pool: Piscina | null = null;

function digestPool(): Piscina {
  pool ??= new Piscina({
    filename: new URL('./digest-worker.mjs', import.meta.url).href,
    maxThreads: Math.max(1, Math.min(MAX_THREADS, availableParallelism())),
    minThreads: 0,
    idleTimeout: IDLE_MS,
  });
  return pool;
}

/**
 * The digests of `buf`'s blocks of `blockBytes` (the last block may be short): 16 bytes per
 * block, in order. `buf` is copied to the thread; the caller may reuse it at once.
 */
export async function digestBlocks(buf: Buffer, blockBytes: number): Promise<Buffer> {
  if (!Number.isSafeInteger(blockBytes) || blockBytes <= 0) throw new RangeError(`digest block size ${blockBytes} is not a positive integer`);
  if (buf.length === 0) return Buffer.alloc(0);
  const data = new Uint8Array(buf.length);
  data.set(buf);
  const out = (await digestPool().run({ data, blockBytes }, { transferList: [data.buffer] })) as Uint8Array;
  return Buffer.from(out.buffer, out.byteOffset, out.byteLength);
}

/** indexes of the blocks whose digests differ between `a` and `b` (same length) */
export function differingBlocks(a: Buffer, b: Buffer): number[] {
  if (a.length !== b.length) throw new RangeError(`digest lists of ${a.length} and ${b.length} bytes`);
  const out: number[] = [];
  for (let i = 0, o = 0; o < a.length; i++, o += DIGEST_BYTES) {
    if (a.compare(b, o, o + DIGEST_BYTES, o, o + DIGEST_BYTES) !== 0) out.push(i);
  }
  return out;
}

/** Stop the digest threads (the engine is closing). A later digest starts a new pool. */
export async function closeDigestPool(): Promise<void> {
  const p = pool;
  pool = null;
  await p?.destroy();
}

/**
 * Per-device I/O statistics: for each bio op, how many completed, how many of those failed,
 * the bytes of the successful ones, and a latency histogram (for Prometheus: counters and a
 * histogram per device and op).
 *
 * What is counted (MappedDevice, src/core/mapped-device.ts):
 * - every bio dispatched to the device's live table, at completion, success or error, with
 *   its latency from dispatch to completion. Receiver-submitted bios (a secondary device's
 *   replication) count like any other. A bio queued while the device is suspended is timed
 *   from its dispatch at resume: the time it waited in the queue is not in its latency.
 *   One bio is one I/O as the engine sees it: the NBD server reads a READ above 256 KiB in
 *   256 KiB pieces, each a bio of its own (docs/nbd.md).
 * - a bio the device refuses before dispatch (the contract checks: invalid range or buffer,
 *   read-only, secondary, beyond the end, removed): counted as a failed bio of its op, with a
 *   latency of 0 (it never ran: it lands in the lowest bucket and adds nothing to `seconds`),
 *   so that `count` always equals the sum of `buckets` and errors a client saw are errors
 *   here. A bio whose op is not one of IO_OPS is not counted.
 * - the file I/O of NBD connection threads (src/nbd/conn-worker.ts), which read and write a
 *   `linear`-over-file device's files without `submit`: each thread counts the READs and
 *   WRITEs it serves from the files itself, timed from the file call to its completion,
 *   into a slab of its own of that device's statistics. What a thread passes to the main
 *   thread (FLUSH, TRIM, WRITE_ZEROES, I/O outside its file ranges or while the device is
 *   suspended) goes through `submit` and is counted there, once. (A thread's FLUSH also
 *   flushes the thread's own descriptors; the flush's latency here is the main thread's part.)
 *
 * Not counted: I/O the engine does for itself inside targets (a mirror's resync, a
 * replicator's shipping, dirty logs) other than through a device's `submit`, and BLOCK_STATUS
 * (allocation queries are not I/O).
 *
 * Layout: a slab is a Float64Array over a SharedArrayBuffer, SLAB_CELLS cells, for each op in
 * IO_OPS order [errors, bytes, seconds, bucket 0 … bucket N] (no count cell: a count is the
 * sum of its buckets). A device has slab 0, written by the main thread, and one slab per
 * connection thread that served it (slab n for the thread numbered n, see claimWriter). Each
 * slab has exactly one writer, so plain (non-atomic) adds are enough; `snapshot` sums the
 * slabs. A reader racing a writer may see an I/O's bucket before its bytes or seconds (off by
 * one I/O, never torn numbers: an aligned 8-byte store is not split).
 *
 * Cost of one I/O: a performance.now() at start and at completion, a bucket search (a few
 * compares: latencies are mostly short, and the search starts at the shortest bound), and
 * four float adds into the slab. Nothing is allocated per I/O once warm: completion callbacks
 * come from a free list (IoMeter), and no message is sent.
 */

export const IO_OPS = ['read', 'write', 'flush', 'discard', 'write-zeroes'] as const; // = BioOp values
export type IoOp = (typeof IO_OPS)[number];

/** upper bounds (seconds) of the latency histogram buckets; one more bucket (+Inf) follows */
export const LATENCY_BOUNDS_S: readonly number[] = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export interface IoOpStats {
  /** completed bios of this op (success or error) */
  count: number;
  /** of which failed */
  errors: number;
  /** bytes of the successful read/write/discard/write-zeroes bios (0 for flush; failed bios add none) */
  bytes: number;
  /** sum of latencies */
  seconds: number;
  /** NON-cumulative counts per bucket, length LATENCY_BOUNDS_S.length + 1 (a latency equal to a bound is in that bound's bucket) */
  buckets: number[];
}

export interface IoStatsSnapshot { ops: Record<IoOp, IoOpStats> }

/** an op's index in IO_OPS, which is also its place in a slab */
export const OP_INDEX: Readonly<Record<IoOp, number>> = Object.freeze({ read: 0, write: 1, flush: 2, discard: 3, 'write-zeroes': 4 });

const BUCKETS = LATENCY_BOUNDS_S.length + 1;
const ERRORS = 0;
const BYTES = 1;
const SECONDS = 2;
const BUCKET0 = 3;
const OP_CELLS = BUCKET0 + BUCKETS;
/** cells (float64) in one slab */
export const SLAB_CELLS = IO_OPS.length * OP_CELLS;

/** a zeroed slab in shared memory (it can be posted to a worker thread, which then writes the same cells) */
export function newSlab(): Float64Array {
  return new Float64Array(new SharedArrayBuffer(SLAB_CELLS * Float64Array.BYTES_PER_ELEMENT));
}

/** the bucket a latency falls in: the first whose bound is ≥ it (the last, +Inf, if none) */
export function bucketOf(seconds: number): number {
  const bounds = LATENCY_BOUNDS_S;
  let b = 0;
  while (b < bounds.length && seconds > bounds[b]!) b++;
  return b;
}

/** count one completed I/O of op index `op` in `slab` (whose only writer the caller is) */
export function record(slab: Float64Array, op: number, bytes: number, seconds: number, failed: boolean): void {
  const base = op * OP_CELLS;
  if (failed) slab[base + ERRORS]++;
  else slab[base + BYTES] += bytes;
  slab[base + SECONDS] += seconds;
  slab[base + BUCKET0 + bucketOf(seconds)]++;
}

/** the sum of `slabs` (holes in a sparse array are skipped) */
export function snapshot(slabs: ReadonlyArray<Float64Array | undefined>): IoStatsSnapshot {
  const ops = {} as Record<IoOp, IoOpStats>;
  IO_OPS.forEach((name, i) => {
    const base = i * OP_CELLS;
    const s: IoOpStats = { count: 0, errors: 0, bytes: 0, seconds: 0, buckets: new Array<number>(BUCKETS).fill(0) };
    for (const slab of slabs) {
      if (!slab) continue;
      s.errors += slab[base + ERRORS]!;
      s.bytes += slab[base + BYTES]!;
      s.seconds += slab[base + SECONDS]!;
      for (let b = 0; b < BUCKETS; b++) s.buckets[b]! += slab[base + BUCKET0 + b]!;
    }
    for (const n of s.buckets) s.count += n;
    ops[name] = s;
  });
  return { ops };
}

/**
 * A device's statistics: slab 0 for the main thread, slab n for connection thread n (made
 * when that thread first serves the device). They belong to the device, not to a table: a
 * reload or a rename keeps them.
 */
export class IoStats {
  readonly #slabs: Array<Float64Array | undefined> = [newSlab()];

  /** the main thread's slab */
  get main(): Float64Array {
    return this.#slabs[0]!;
  }

  /** the slab of writer `n` (0: the main thread; n ≥ 1: connection thread n) */
  slab(n: number): Float64Array {
    return (this.#slabs[n] ??= newSlab());
  }

  snapshot(): IoStatsSnapshot {
    return snapshot(this.#slabs);
  }
}

/** an I/O being timed: hand `ok` and `fail` to its promise's then() */
export interface Timed {
  op: number;
  bytes: number;
  t0: number;
  readonly ok: () => void;
  readonly fail: (err: unknown) => never;
}

/** completion records kept for reuse per meter (more in flight at once are allocated and dropped) */
const FREE_MAX = 1024;

/**
 * Times I/O into one slab: `start()` before the I/O, then `p.then(t.ok, t.fail)` (or `t.ok()`
 * when it completed synchronously). Each completion records the I/O, calls `after` (the
 * owner's in-flight bookkeeping) and, on failure, rethrows `mapErr(err)`. The records and
 * their two callbacks are reused, so a warm meter allocates nothing per I/O.
 */
export class IoMeter {
  readonly #slab: Float64Array;
  readonly #after: () => void;
  readonly #mapErr: (err: unknown) => unknown;
  readonly #free: Timed[] = [];

  constructor(slab: Float64Array, after: () => void = noop, mapErr: (err: unknown) => unknown = same) {
    this.#slab = slab;
    this.#after = after;
    this.#mapErr = mapErr;
  }

  start(op: number, bytes: number): Timed {
    const t = this.#free.pop() ?? this.#make();
    t.op = op;
    t.bytes = bytes;
    t.t0 = performance.now();
    return t;
  }

  /** an I/O refused before it ran: a failure with a latency of 0 */
  refused(op: number): void {
    record(this.#slab, op, 0, 0, true);
  }

  #make(): Timed {
    const t: Timed = {
      op: 0, bytes: 0, t0: 0,
      ok: () => this.#end(t, false),
      fail: (err: unknown): never => {
        this.#end(t, true);
        throw this.#mapErr(err);
      },
    };
    return t;
  }

  #end(t: Timed, failed: boolean): void {
    record(this.#slab, t.op, t.bytes, (performance.now() - t.t0) / 1000, failed);
    if (this.#free.length < FREE_MAX) this.#free.push(t);
    this.#after();
  }
}

function noop(): void {}
function same(err: unknown): unknown {
  return err;
}

// ---- writer numbers of connection threads (main thread only) ----

const writers = new Set<number>();

/**
 * A number ≥ 1 for a connection thread's slabs, unique among the threads alive in this
 * process (every NBD server's): the lowest free one, so a thread that replaces one that exited
 * carries on in its slabs instead of making new ones.
 */
export function claimWriter(): number {
  let n = 1;
  while (writers.has(n)) n++;
  writers.add(n);
  return n;
}

/** the thread numbered `n` has exited: nothing writes its slabs any more */
export function releaseWriter(n: number): void {
  writers.delete(n);
}

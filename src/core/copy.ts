/**
 * Copy service (dm-kcopyd's role): copies sector ranges from one device to one or more
 * others with bounded concurrency, an optional rate limit and progress reports. Mirror and
 * replicator resync build on it.
 */
import type { BlockDev } from './types.ts';
import { DmError } from './errors.ts';
import { EMPTY } from './bio.ts';

export interface CopyRange {
  sector: number;
  sectors: number;
}

export interface CopyProgress {
  doneSectors: number;
  totalSectors: number;
  /** bytes per second since start */
  rate: number;
  /** seconds remaining at the current rate (Infinity when unknown) */
  eta: number;
}

export interface CopyOptions {
  src: BlockDev;
  dst: readonly BlockDev[];
  ranges: readonly CopyRange[];
  /** largest single I/O in sectors (default 2048 = 1 MiB) */
  chunkSectors?: number;
  /** copies in flight (default 4) */
  concurrency?: number;
  /** bytes per second, 0 = unlimited; read on every chunk so callers may change it */
  rate?: () => number;
  onProgress?: (p: CopyProgress) => void;
  /** called before each chunk: may wait (e.g. for writes in flight to that range) */
  before?: (r: CopyRange) => Promise<void> | void;
  /** called after each chunk lands on every destination */
  after?: (r: CopyRange) => void;
  signal?: AbortSignal;
}

/** Copy every range; resolves with the sectors copied. Rejects on the first I/O error. */
export async function copyRanges(opts: CopyOptions): Promise<number> {
  const chunk = opts.chunkSectors ?? 2048;
  const concurrency = Math.max(1, opts.concurrency ?? 4);
  const total = opts.ranges.reduce((a, r) => a + r.sectors, 0);
  const started = Date.now();
  let done = 0;
  let ri = 0;
  let off = 0;
  const take = (): CopyRange | null => {
    while (ri < opts.ranges.length) {
      const r = opts.ranges[ri]!;
      if (off < r.sectors) {
        const n = Math.min(chunk, r.sectors - off);
        const piece = { sector: r.sector + off, sectors: n };
        off += n;
        return piece;
      }
      ri++;
      off = 0;
    }
    return null;
  };
  const worker = async (): Promise<void> => {
    const buf = Buffer.allocUnsafe(chunk * 512);
    for (let r = take(); r; r = take()) {
      if (opts.signal?.aborted) throw new DmError('EINTR', 'copy aborted');
      await opts.before?.(r);
      const data = buf.subarray(0, r.sectors * 512);
      await opts.src.submit({ op: 'read', sector: r.sector, sectors: r.sectors, data, flags: {} });
      await Promise.all(opts.dst.map((d) => d.submit({ op: 'write', sector: r.sector, sectors: r.sectors, data, flags: {} })));
      opts.after?.(r);
      done += r.sectors;
      const elapsed = Math.max(1e-3, (Date.now() - started) / 1000);
      const rate = (done * 512) / elapsed;
      opts.onProgress?.({ doneSectors: done, totalSectors: total, rate, eta: rate > 0 ? ((total - done) * 512) / rate : Infinity });
      const limit = opts.rate?.() ?? 0;
      if (limit > 0) {
        const due = started + ((done * 512) / limit) * 1000;
        const wait = due - Date.now();
        if (wait > 0) await new Promise((res) => setTimeout(res, wait));
      }
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  await Promise.all(opts.dst.map((d) => d.submit({ op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} })));
  return done;
}

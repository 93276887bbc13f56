/**
 * One request: its pooled record, the checks made before the handle sees it, and running it
 * on the export handle, where each command becomes one handle call whose promise settles
 * into the request's pre-bound callbacks (one hop).
 *
 * READs above READ_PIECE (256 KiB) are read in pieces, because page-cache reads slow down
 * above that size: the pieces are read concurrently into the one reply buffer (a slow or
 * remote device serves them in parallel; a cached file reads each synchronously), and the
 * reply goes out whole once all are in: one OFFSET_DATA chunk under structured replies, or a
 * simple reply. One chunk per READ, not one per piece: a client takes a 1 MiB reply in with
 * one header and one receive loop, and fio 1 MiB reads ran 1.2x faster so (docs/benchmarks.md #40).
 */
import type { Extent } from '../core/types.ts';
import { SYNC_DONE } from '../core/file-dev.ts';
import type { ExportHandle } from './export.ts';
import type { BufferPool } from './buffer-pool.ts';
import * as C from './constants.ts';

/** one request in flight; pooled by the transmission loop, so fields are reset on reuse */
export class Req {
  type = 0;
  flags = 0;
  cookieHi = 0;
  cookieLo = 0;
  offset = 0;
  /** low 32 bits of the offset (alignment is decided by these alone) */
  offsetLo = 0;
  length = 0;
  /** WRITE payload or READ buffer */
  buf: Buffer | null = null;
  /** the pooled buffer backing a READ's `buf` */
  pooled: Buffer | null = null;
  /** bytes this request holds against the connection's in-flight budget */
  weight = 0;
  /** a reply was already forced (ESHUTDOWN at the end of a grace period) */
  replied = false;
  /** when a READ started on the handle (performance.now()), for the read window */
  startedMs = 0;
  onOk: () => void = noop;
  onErr: (err: unknown) => void = noop;
  onExtents: (extents: Extent[]) => void = noop;
}

function noop(): void {}

/** what the checks need to know about the connection */
export interface CheckContext {
  size: number;
  readOnly: boolean;
  structured: boolean;
  /** `base:allocation` selected for this export */
  baseAllocation: boolean;
  /** export gone or server closing */
  ending: boolean;
}

/**
 * The wire errno for a request that must not reach the handle, or 0 (NBD.md A.4/A.6):
 * ESHUTDOWN while ending; EINVAL for unknown commands, unknown or misplaced flags, DF without
 * structured replies, FLUSH with a range, BLOCK_STATUS without a context, zero or
 * misaligned ranges (a short final sector is allowed) and reads/trims past the end; EPERM
 * for changes to a read-only export; ENOSPC for writes past the end; EOVERFLOW for reads
 * above the maximum payload; ENOTSUP for FAST_ZERO.
 */
export function checkRequest(r: Req, ctx: CheckContext): number {
  const t = r.type;
  const f = r.flags;
  if (ctx.ending) return C.NBD_ESHUTDOWN;
  if (t > C.CMD_BLOCK_STATUS || t === C.CMD_DISC) return C.NBD_EINVAL;
  if ((f & ~C.allowedCmdFlags(t)) !== 0) return C.NBD_EINVAL;
  if ((f & C.CMD_FLAG_DF) !== 0 && !ctx.structured) return C.NBD_EINVAL;
  if (t === C.CMD_FLUSH) return r.offset !== 0 || r.length !== 0 ? C.NBD_EINVAL : 0;
  const writes = t === C.CMD_WRITE || t === C.CMD_WRITE_ZEROES;
  if (ctx.readOnly && (writes || t === C.CMD_TRIM)) return C.NBD_EPERM;
  if (t === C.CMD_BLOCK_STATUS && !(ctx.structured && ctx.baseAllocation)) return C.NBD_EINVAL;
  // alignment depends on the low 32 bits alone (2^32 is a multiple of 512)
  if (r.length === 0 || (r.offsetLo & 511) !== 0) return C.NBD_EINVAL;
  const end = r.offset + r.length;
  if ((r.length & 511) !== 0 && end !== ctx.size) return C.NBD_EINVAL;
  if (end > ctx.size) return writes ? C.NBD_ENOSPC : C.NBD_EINVAL;
  if (t === C.CMD_READ && r.length > C.BLOCK_MAX) return C.NBD_EOVERFLOW;
  if (t === C.CMD_WRITE_ZEROES && (f & C.CMD_FLAG_FAST_ZERO) !== 0) return C.NBD_ENOTSUP;
  return 0;
}

/** start `r` on `h`; completion arrives through r.onOk / r.onErr / r.onExtents */
export function execute(h: ExportHandle, r: Req, pool: BufferPool): void {
  const fua = (r.flags & C.CMD_FLAG_FUA) !== 0;
  let p: Promise<unknown>;
  try {
    switch (r.type) {
      case C.CMD_READ:
        r.pooled = pool.get(r.length);
        r.buf = r.pooled.length === r.length ? r.pooled : r.pooled.subarray(0, r.length);
        if (r.length > C.READ_PIECE) return readPieces(h, r);
        p = h.read(r.buf, r.offset);
        break;
      case C.CMD_WRITE:
        p = h.write(r.buf!, r.offset, fua);
        break;
      case C.CMD_FLUSH:
        p = h.flush();
        break;
      case C.CMD_TRIM:
        p = h.trim(r.offset, r.length, fua);
        break;
      case C.CMD_WRITE_ZEROES:
        p = h.writeZeroes(r.offset, r.length, { fua, noHole: (r.flags & C.CMD_FLAG_NO_HOLE) !== 0 });
        break;
      case C.CMD_CACHE:
        // a prefetch hint with no semantic effect
        return r.onOk();
      case C.CMD_BLOCK_STATUS:
        h.allocation(r.offset, r.length).then(r.onExtents, r.onErr);
        return;
      default:
        return r.onErr(Object.assign(new Error('unknown command'), { code: 'EINVAL' }));
    }
  } catch (err) {
    // a handle that throws instead of rejecting still gets an error reply
    return r.onErr(err);
  }
  p.then(r.onOk, r.onErr);
}

/**
 * A large READ's pieces, read concurrently into r.buf; r.onOk or r.onErr once every piece
 * has settled (a failed piece does not free the buffer while others still read into it).
 * The final settlement is always a turn later, as for any handle call, even when every
 * piece was read synchronously.
 */
function readPieces(h: ExportHandle, r: Req): void {
  const buf = r.buf!;
  let pending = Math.ceil(r.length / C.READ_PIECE);
  let failure: unknown = null;
  const settle = (err: unknown): void => {
    if (err !== null && failure === null) failure = err;
    if (--pending > 0) return;
    if (failure === null) r.onOk();
    else r.onErr(failure);
  };
  const ok = (): void => settle(null);
  const fail = (err: unknown): void => settle(err ?? new Error('read failed'));
  for (let p = 0; p < r.length; p += C.READ_PIECE) {
    let started: Promise<void>;
    try {
      started = h.read(buf.subarray(p, Math.min(p + C.READ_PIECE, r.length)), r.offset + p);
    } catch (err) {
      started = Promise.reject(err);
    }
    if (started === SYNC_DONE && pending > 1) settle(null);
    else started.then(ok, fail);
  }
}

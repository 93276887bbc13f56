/**
 * Recovery of a `ringbuffer` log: from the tail position of the newest valid checkpoint,
 * scan entries forward, reading the ring in large chunks and checking each entry:
 *
 *   1. a header of this log (magic, uuid, kind, op) with the expected seq (one more than the
 *      last valid entry's; the checkpoint's tail seq for the first);
 *   2. for a wrap marker: its CRC; the scan continues at ring offset 0 (once per entry);
 *   3. for an entry: it ends inside the ring, its CRC32C (header fields and payload) matches,
 *      and its back link (the CRC of entry seq − 1 it stores) matches the previous entry's
 *      CRC (the checkpoint's `tailPrevCrc` for the first).
 *
 * The first position that fails ends the scan: everything from there on is discarded. After
 * a process crash it was never acknowledged (appends complete in order, so no acknowledged
 * entry sits after an invalid one, and the page cache kept every completed write); after a
 * power loss it may have been acknowledged without a flush, and never reached the disk. The back link rejects an old entry of this same log that happens to sit
 * where the next entry would (an unacknowledged entry written concurrently with a torn one
 * before an earlier crash, with the right seq at the right place); the uuid rejects entries
 * of an older log made at the same place.
 */
import { ioBuffer } from '../core/io-buffer.ts';
import { ENTRY_HEADER_BYTES, decodeEntryHeader, entryBytes, entryCrc } from './ring-format.ts';
import type { Checkpoint } from './ring-format.ts';
import type { Position } from './ring-index.ts';
import type { LogDevice } from './ring-io.ts';

/** bytes read per device read while scanning */
export const SCAN_CHUNK = 1024 * 1024;

/** What the scan found. */
export interface ScanResult {
  /** seq of the last valid entry (the checkpoint's tail seq − 1 when there is none) */
  readonly head: number;
  /** valid entries found */
  readonly entries: number;
  /** ring offset after the last valid entry: where the next entry (or wrap marker) goes */
  readonly headOffset: number;
  /** ring bytes from the checkpoint's tail offset to headOffset, wrap waste included */
  readonly usedBytes: number;
  /** CRC of the last valid entry (the checkpoint's tailPrevCrc when there is none) */
  readonly lastCrc: number;
  /** the scan stopped at an entry of this log with the expected seq that failed a check */
  readonly tornTail: boolean;
}

/** What the scan reports on its way. */
export interface ScanOptions {
  /** called with a valid entry's position every `hintStride` scanned bytes */
  readonly hint: (pos: Position) => void;
  readonly hintStride: number;
}

/** Scan the ring of `ringBytes` from checkpoint `cp`. Rejects with the device's BlockError. */
export async function scanRing(io: LogDevice, uuid: Buffer, ringBytes: number, cp: Checkpoint, opts: ScanOptions): Promise<ScanResult> {
  const limit = ringBytes - ENTRY_HEADER_BYTES;
  let chunk = ioBuffer(Math.min(SCAN_CHUNK, ringBytes));
  let chunkOff = 0;
  let chunkLen = 0;
  /** make chunk hold ring bytes [off, off + n) */
  const cover = async (off: number, n: number): Promise<void> => {
    if (off >= chunkOff && off + n <= chunkOff + chunkLen) return;
    const len = Math.max(n, Math.min(SCAN_CHUNK, ringBytes - off));
    if (len > chunk.length) chunk = ioBuffer(len);
    await io.readRing(off, chunk.subarray(0, len));
    chunkOff = off;
    chunkLen = len;
  };

  let seq = cp.tailSeq;
  let off = cp.tailOffset;
  let prevCrc = cp.tailPrevCrc;
  let headOffset = off;
  let used = 0;
  let waste = 0;
  let entries = 0;
  let tornTail = false;
  let sinceHint = opts.hintStride;
  let wrappedSeq = 0;
  while (off <= limit && used <= ringBytes) {
    await cover(off, ENTRY_HEADER_BYTES);
    const at = off - chunkOff;
    const rec = decodeEntryHeader(chunk, at, uuid);
    if (!rec || rec.seq !== seq) break;
    if (rec.kind === 'wrap') {
      if (off === 0 || wrappedSeq === seq || entryCrc(chunk, at, null) !== rec.crc) {
        tornTail = true;
        break;
      }
      wrappedSeq = seq;
      waste = ringBytes - off;
      off = 0;
      continue;
    }
    const bytes = entryBytes(rec.payloadBytes);
    if (off + bytes > limit || rec.prevCrc !== prevCrc) {
      tornTail = true;
      break;
    }
    await cover(off, bytes);
    if (entryCrc(chunk, off - chunkOff, null) !== rec.crc) {
      tornTail = true;
      break;
    }
    if (sinceHint >= opts.hintStride) {
      opts.hint({ seq, off, prevCrc });
      sinceHint = 0;
    }
    sinceHint += bytes;
    entries++;
    used += waste + bytes;
    waste = 0;
    prevCrc = rec.crc;
    seq++;
    off += bytes;
    headOffset = off;
  }
  return { head: seq - 1, entries, headOffset, usedBytes: used, lastCrc: prevCrc, tornTail };
}

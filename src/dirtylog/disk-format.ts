/**
 * The on-disk format of the `disk` dirty log, byte-compatible with the kernel's dm-log.c
 * (a log written by one can be used by the other):
 *
 *   byte 0     u32 LE  magic       0x4D695272 ("MiRr" read as a little-endian u32)
 *   byte 4     u32 LE  version     2 (1 is read as 2: they differ only on big-endian hosts)
 *   byte 8     u64 LE  nr_regions  regions the bitset describes
 *   byte 16…1023       unused (zero when dmkit writes them)
 *   byte 1024…         clean bits: bit i of the little-endian 32-bit word stream is region
 *                      i (= bit i mod 8 of byte 1024 + ⌊i/8⌋); 1 = clean (in sync)
 *
 * The bitset is ⌈nr_regions / 64⌉ · 8 bytes (the kernel rounds to unsigned longs); the
 * whole area is rounded up to 512 bytes and always read and written as one I/O. The
 * kernel's format has no checksum: a bad magic is the only sign of "no log here", and it
 * starts a new log. Encoding and decoding only; the logic is in disk.ts.
 */
import { bitsetBytes } from './bitset.ts';

export const MIRROR_MAGIC = 0x4d695272;
export const MIRROR_DISK_VERSION = 2;
export const HEADER_BYTES = 16;
/** the kernel's LOG_OFFSET (2 sectors): where the clean bits start */
export const BITS_OFFSET = 1024;

export interface DiskLogHeader {
  magic: number;
  version: number;
  nrRegions: number;
}

/** Bytes of the log area for `nrRegions` regions: header sectors + bitset, rounded to 512. */
export function logAreaBytes(nrRegions: number): number {
  return Math.ceil((BITS_OFFSET + bitsetBytes(nrRegions)) / 512) * 512;
}

/** Write the 16-byte header at byte 0 of `buf`. */
export function encodeHeader(h: DiskLogHeader, buf: Uint8Array): void {
  const view = Buffer.from(buf.buffer, buf.byteOffset, HEADER_BYTES);
  view.writeUInt32LE(h.magic >>> 0, 0);
  view.writeUInt32LE(h.version >>> 0, 4);
  view.writeBigUInt64LE(BigInt(h.nrRegions), 8);
}

/** Read the 16-byte header at byte 0 of `buf` (no validation). */
export function decodeHeader(buf: Uint8Array): DiskLogHeader {
  const view = Buffer.from(buf.buffer, buf.byteOffset, HEADER_BYTES);
  const nr = view.readBigUInt64LE(8);
  return {
    magic: view.readUInt32LE(0),
    version: view.readUInt32LE(4),
    nrRegions: nr > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(nr),
  };
}

export type HeaderCheck = 'ok' | 'bad-magic' | 'bad-version';

/** Is this a log dmkit (and the kernel) can use? Version 1 counts as 2. */
export function checkHeader(h: DiskLogHeader): HeaderCheck {
  if (h.magic !== MIRROR_MAGIC) return 'bad-magic';
  if (h.version !== MIRROR_DISK_VERSION && h.version !== 1) return 'bad-version';
  return 'ok';
}

/** The clean bits of a log area of `nrRegions` regions: a view into `area`, not a copy. */
export function cleanBitsView(area: Uint8Array, nrRegions: number): Uint8Array {
  return area.subarray(BITS_OFFSET, BITS_OFFSET + bitsetBytes(nrRegions));
}

/** A whole log area: header for `nrRegions`, clean bit i = `isClean(i)`. */
export function encodeDiskLog(nrRegions: number, isClean: (region: number) => boolean): Buffer {
  const area = Buffer.alloc(logAreaBytes(nrRegions));
  encodeHeader({ magic: MIRROR_MAGIC, version: MIRROR_DISK_VERSION, nrRegions }, area);
  for (let i = 0; i < nrRegions; i++) {
    if (isClean(i)) area[BITS_OFFSET + (i >>> 3)]! |= 1 << (i & 7);
  }
  return area;
}

/** Read a log area: its header and its clean bits (false beyond the area's end). */
export function decodeDiskLog(area: Uint8Array): { header: DiskLogHeader; isClean(region: number): boolean } {
  const header = decodeHeader(area);
  return {
    header,
    isClean(region: number): boolean {
      const at = BITS_OFFSET + (region >>> 3);
      return at < area.length && (area[at]! & (1 << (region & 7))) !== 0;
    },
  };
}

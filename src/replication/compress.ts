/**
 * Payload compression for the tcp slink (`compress=zstd|lz4|none`): zstd through
 * @mongodb-js/zstd and LZ4 through lz4-napi, both native and run off the event loop's
 * critical path (zstd on libuv's pool). The sender keeps a payload raw when compressing
 * does not make it smaller, so incompressible data costs one attempt, not a bigger frame.
 */
import { compress as zstdCompress, decompress as zstdDecompress } from '@mongodb-js/zstd';
import { compress as lz4Compress, uncompress as lz4Uncompress } from 'lz4-napi';
import { Codec, ProtocolError } from './protocol.ts';

export type CompressName = 'none' | 'lz4' | 'zstd';
export const CODECS: Record<CompressName, Codec> = { none: Codec.NONE, lz4: Codec.LZ4, zstd: Codec.ZSTD };
const ZSTD_LEVEL = 3;

/** `data` compressed with `codec`, or null when that is not smaller (send it raw) */
export async function compress(codec: Codec, data: Buffer): Promise<Buffer | null> {
  if (codec === Codec.NONE || data.length < 512) return null;
  const out = codec === Codec.LZ4 ? await lz4Compress(data) : await zstdCompress(data, ZSTD_LEVEL);
  return out.length < data.length ? out : null;
}

/** the `rawBytes` bytes a compressed payload stands for; a ProtocolError when it does not decode to exactly that */
export async function decompress(codec: Codec, data: Buffer, rawBytes: number): Promise<Buffer> {
  if (codec === Codec.NONE) return data;
  if (codec === Codec.LZ4) {
    // lz4-napi allocates what the payload's 4-byte little-endian size prefix says before it
    // decodes (up to 4 GiB, an abort when that fails): the prefix must be the frame's size
    const said = data.length >= 4 ? data.readUInt32LE(0) : -1;
    if (said !== rawBytes) throw new ProtocolError(`lz4 payload says it holds ${said} bytes, the frame says ${rawBytes}`);
  }
  if (codec === Codec.ZSTD) zstdBound(data, rawBytes);
  let out: Buffer;
  try {
    out = codec === Codec.LZ4 ? await lz4Uncompress(data) : await zstdDecompress(data);
  } catch (err) {
    throw new ProtocolError(`compressed payload does not decode: ${(err as Error).message}`);
  }
  if (out.length !== rawBytes) throw new ProtocolError(`compressed payload decodes to ${out.length} bytes, the frame says ${rawBytes}`);
  return out;
}

/** the largest block a zstd frame may regenerate (RFC 8878 Block_Maximum_Size) */
const ZSTD_BLOCK = 128 * 1024;

/**
 * Refuse a zstd payload that could decode to much more than `rawBytes` before it is
 * decoded (the library decodes a stream of frames and allocates as it goes): exactly one
 * frame, no dictionary, and no more blocks than `rawBytes` needs — so at most one block
 * (128 KiB) over, whatever the bytes claim. Walks the frame and block headers only.
 */
export function zstdBound(d: Buffer, rawBytes: number): void {
  const bad = (why: string): never => {
    throw new ProtocolError(`zstd payload refused: ${why}`);
  };
  if (d.length < 6 || d.readUInt32LE(0) !== 0xfd2fb528) bad('not a zstd frame');
  const fhd = d[4]!;
  if (fhd & 0x08) bad('reserved header bit set');
  if (fhd & 0x03) bad('a dictionary is named');
  const single = (fhd & 0x20) !== 0;
  const fcsFlag = fhd >> 6;
  let at = 5 + (single ? 0 : 1) + [single ? 1 : 0, 2, 4, 8][fcsFlag]!;
  let regenerated = 0;
  let blocks = 0;
  const maxBlocks = Math.ceil(rawBytes / ZSTD_BLOCK) + 1;
  for (let last = false; !last; ) {
    if (at + 3 > d.length) bad('truncated block header');
    const h = d[at]! | (d[at + 1]! << 8) | (d[at + 2]! << 16);
    at += 3;
    last = (h & 1) === 1;
    const type = (h >> 1) & 3;
    const size = h >>> 3;
    if (type === 3) bad('reserved block type');
    if (++blocks > maxBlocks) bad(`more blocks than ${rawBytes} bytes need`);
    regenerated += type === 2 ? ZSTD_BLOCK : size;
    at += type === 1 ? 1 : size;
  }
  if (fhd & 0x04) at += 4; // content checksum
  if (at !== d.length) bad(`${d.length - at} bytes after the frame (one frame only)`);
  if (regenerated > rawBytes + ZSTD_BLOCK) bad(`blocks may decode to ${regenerated} bytes, the frame says ${rawBytes}`);
}

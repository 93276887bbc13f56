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
  let out: Buffer;
  try {
    out = codec === Codec.LZ4 ? await lz4Uncompress(data) : await zstdDecompress(data);
  } catch (err) {
    throw new ProtocolError(`compressed payload does not decode: ${(err as Error).message}`);
  }
  if (out.length !== rawBytes) throw new ProtocolError(`compressed payload decodes to ${out.length} bytes, the frame says ${rawBytes}`);
  return out;
}

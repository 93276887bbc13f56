// A digest thread (digest.ts): xxh3-128 of each block of a buffer, 16 bytes per block,
// big-endian. Plain JavaScript, so it runs the same under tsx and from the built dist/
// (tools/build.mjs copies it there) without a loader of its own.
import xxhash from '@node-rs/xxhash';

const MASK = (1n << 64n) - 1n;

/** `{ data, blockBytes }` → the digests of `data`'s blocks (the last may be short) */
export default function digest({ data, blockBytes }) {
  const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const blocks = Math.ceil(buf.length / blockBytes);
  const out = Buffer.allocUnsafeSlow(blocks * 16) // its own memory: a pooled slice would carry the whole pool back;
  for (let i = 0; i < blocks; i++) {
    const h = xxhash.xxh3.xxh128(buf.subarray(i * blockBytes, Math.min(buf.length, (i + 1) * blockBytes)));
    out.writeBigUInt64BE(h >> 64n, i * 16);
    out.writeBigUInt64BE(h & MASK, i * 16 + 8);
  }
  return out;
}

// A digest thread (digest.ts): xxh3-128 of each block of a buffer, 16 bytes per block,
// big-endian (high 64 bits first: XXH128's canonical form). Plain JavaScript, so it runs the
// same under tsx and from the built dist/ (tools/build.mjs copies it there) without a loader
// of its own.
//
// The hash is xxhash-addon's (the xxHash C library, SIMD picked at run time): on a 4 KiB
// block 3-4x as fast as @node-rs/xxhash's xxh3.xxh128, whose digests are the same bits
// (test/unit/digest.test.ts compares them). @node-rs/xxhash stays as the fallback for a
// machine where the addon neither loads from its prebuilt binaries nor builds.

/** which library hashes here: 'xxhash-addon', or '@node-rs/xxhash' (the fallback) */
export let IMPLEMENTATION = 'xxhash-addon';

/** (block, out, at): write `block`'s digest into `out` at `at` */
let hashInto;
try {
  const { XXHash128 } = (await import('xxhash-addon')).default;
  hashInto = (block, out, at) => out.set(XXHash128.hash(block), at);
} catch {
  IMPLEMENTATION = '@node-rs/xxhash';
  const xxhash = (await import('@node-rs/xxhash')).default;
  const MASK = (1n << 64n) - 1n;
  hashInto = (block, out, at) => {
    const h = xxhash.xxh3.xxh128(block);
    out.writeBigUInt64BE(h >> 64n, at);
    out.writeBigUInt64BE(h & MASK, at + 8);
  };
}

/**
 * `{ data, blockBytes }` → the digests of `data`'s blocks (the last may be short). `data` may
 * be a view of a SharedArrayBuffer (digest.ts lends its read buffers that way: no copy).
 */
export default function digest({ data, blockBytes }) {
  const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const blocks = Math.ceil(buf.length / blockBytes);
  const out = Buffer.allocUnsafeSlow(blocks * 16); // its own memory: a pooled slice would carry the whole pool back
  for (let i = 0, o = 0; i < blocks; i++, o += blockBytes) hashInto(buf.subarray(o, Math.min(buf.length, o + blockBytes)), out, i * 16);
  return out;
}

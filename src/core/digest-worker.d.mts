/** Types of digest-worker.mjs (a digest thread's module; plain JavaScript, see there). */

/** which library hashes: 'xxhash-addon', or '@node-rs/xxhash' (the fallback) */
export declare const IMPLEMENTATION: 'xxhash-addon' | '@node-rs/xxhash';

/** the xxh3-128 digests (16 bytes each, big-endian) of `data`'s blocks of `blockBytes`, the last maybe short */
export default function digest(job: { data: Uint8Array; blockBytes: number }): Uint8Array;

/**
 * Big-endian u64 fields as JavaScript numbers (the wire formats' offsets, ids and sequence
 * numbers stay below 2^53), without a BigInt per field on the hot path.
 */
const TWO32 = 4294967296;

/** write a non-negative safe integer as a big-endian u64 at `at` */
export function writeU64BE(b: Buffer, value: number, at: number): void {
  b.writeUInt32BE(Math.floor(value / TWO32), at);
  b.writeUInt32BE(value >>> 0, at + 4);
}

/** the big-endian u64 at `at`; -1 when it is beyond Number.MAX_SAFE_INTEGER */
export function readU64BE(b: Buffer, at: number): number {
  const hi = b.readUInt32BE(at);
  return hi > 0x1fffff ? -1 : hi * TWO32 + b.readUInt32BE(at + 4);
}

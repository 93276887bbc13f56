/**
 * Reading a byte stream that arrives in chunks: the next `n` bytes of a queue of chunks,
 * a slice of the first chunk when they all sit in it (no copy), else one copy.
 */

/** take the next `n` bytes off `chunks` (which must hold at least `n`); the caller counts what it took */
export function takeBytes(chunks: Buffer[], n: number): Buffer {
  if (n === 0) return Buffer.alloc(0);
  const first = chunks[0]!;
  if (first.length >= n) {
    if (first.length === n) chunks.shift();
    else chunks[0] = first.subarray(n);
    return first.subarray(0, n);
  }
  const out = Buffer.allocUnsafe(n);
  for (let off = 0; off < n; ) {
    const c = chunks[0]!;
    const k = Math.min(c.length, n - off);
    c.copy(out, off, 0, k);
    off += k;
    if (k === c.length) chunks.shift();
    else chunks[0] = c.subarray(k);
  }
  return out;
}

/**
 * Buffers for large reads and writes, placed where the kernel copies fast.
 *
 * glibc serves allocations of 128 KiB and more with mmap, and the data then starts 16 bytes
 * past a page boundary; Node's large Buffers are exactly that. On this project's machines
 * (AMD EPYC) the kernel's copy into user memory (`rep movsb` in pread/recv) runs 4–5× slower
 * when the destination sits a few bytes (8–31) past the source's offset within a page: a
 * page-cache read at a 4 KiB-aligned file offset into such a buffer measured 1.6–2.3 GB/s,
 * the same read 48 bytes further on 7–9 GB/s (docs/benchmarks.md, "buffer placement").
 * Skipping 48 bytes puts a mmap-served buffer at page+64, clear of that window for every
 * 512-byte-aligned file offset; for smaller, heap-served buffers the skip costs nothing.
 */
const SKIP = 48;

/** an uninitialised buffer of `size` bytes for I/O (a view; keep it, not its parent) */
export function ioBuffer(size: number): Buffer {
  return Buffer.allocUnsafeSlow(size + SKIP).subarray(SKIP);
}

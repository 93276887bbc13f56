/**
 * The bio model. Sectors are 512 bytes, always. A bio completes by resolving the promise
 * returned from `submit`, or rejecting with a BlockError.
 */
export const SECTOR_SHIFT = 9;
export const SECTOR_SIZE = 512;

export type BioOp = 'read' | 'write' | 'flush' | 'discard' | 'write-zeroes';

export interface BioFlags {
  /** the write is durable before completion */
  fua?: boolean;
  /** flush the device cache before this bio */
  preflush?: boolean;
  /** write-zeroes: do not deallocate (NBD NO_HOLE) */
  noUnmap?: boolean;
}

/**
 * One I/O. `sector` is device-relative when submitted and target-relative (still in
 * device sectors but offset by the target start) when a target's map sees it: targets
 * receive `sector` relative to the start of their own range.
 * For read/write, `data.length` is the I/O size (a multiple of 512). For discard and
 * write-zeroes, `sectors` is the size and `data` is empty. Flush has neither.
 */
export interface Bio {
  op: BioOp;
  sector: number;
  sectors: number;
  data: Buffer;
  flags: BioFlags;
}

export const EMPTY = Buffer.alloc(0);

export function bio(op: BioOp, sector: number, sectors: number, data: Buffer = EMPTY, flags: BioFlags = {}): Bio {
  return { op, sector, sectors, data, flags };
}

export const sectorsToBytes = (s: number): number => s * SECTOR_SIZE;
export const bytesToSectors = (b: number): number => Math.floor(b / SECTOR_SIZE);

/**
 * What the NBD server needs from the engine: a set of named exports. The daemon adapts
 * the DeviceManager to this interface (src/nbd/provider.ts); the server knows nothing else
 * of the engine. All offsets and lengths here are in bytes; the server has already checked
 * alignment (512) and range before calling.
 */
import type { Extent } from '../core/types.ts';

export interface ExportInfo {
  name: string;
  /** size in bytes */
  size: number;
  readOnly: boolean;
  description?: string;
}

export interface ExportHandle {
  readonly info: ExportInfo;
  /** reads fill `buf` (length = I/O size). Rejections carry a BlockError code (errno name). */
  read(buf: Buffer, offset: number): Promise<void>;
  write(buf: Buffer, offset: number, fua: boolean): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  writeZeroes(offset: number, length: number, opts: { fua: boolean; noHole: boolean }): Promise<void>;
  /** allocation of [offset, offset+length) in sectors-based extents (Extent.sectors × 512 bytes) */
  allocation(offset: number, length: number): Promise<Extent[]>;
  /** the connection is done with the export (drops the open count) */
  close(): void;
  /** called once if the export goes away (device removed, daemon stopping) */
  onGone(cb: () => void): void;
}

export interface ExportProvider {
  /** active exports, for NBD_OPT_LIST */
  list(): ExportInfo[];
  /** info without opening (NBD_OPT_INFO); undefined if unknown */
  info(name: string): ExportInfo | undefined;
  /** open for transmission (counts as an opener); throws DmError ENXIO if unknown */
  open(name: string): ExportHandle;
}

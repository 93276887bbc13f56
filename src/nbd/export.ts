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
  /**
   * Optional: let a connection thread read and write the export's files itself (docs/nbd.md,
   * "Connection threads"). The export calls `b.stop()` when such I/O must stop (suspend,
   * removal) and waits for it, then `b.start()` with the file ranges to use from then on, or
   * null when I/O must go through this handle. Returns the ranges to start with (null: none
   * now) and a detach function, or null if the export never offers file ranges; and where
   * connection thread `writer` counts that I/O (src/core/io-stats.ts: a slab it alone writes).
   */
  bypass?(b: ExportBypass): { ranges: FileRange[] | null; detach(): void; ioSlab?(writer: number): Float64Array } | null;
}

/** Bytes [start, start+length) of an export are bytes [offset, …) of an open file. */
export interface FileRange {
  start: number;
  length: number;
  ref: string;
  path: string;
  /** a descriptor of its own for the file: whoever receives the range closes it */
  fd: number;
  /** the file's flush state, shared by every thread writing it */
  state: Int32Array;
  offset: number;
  /** the file's size in sectors */
  fileSectors: number;
  readOnly: boolean;
}

export interface ExportBypass {
  /** start no more file I/O; resolve once none is in flight */
  stop(): Promise<void>;
  /** the export runs again: file I/O may use `ranges` from now on (null: none) */
  start(ranges: FileRange[] | null): void;
}

/** where an NBD client connected from: its TCP address, or the Unix socket it came in on */
export type NbdPeer =
  | { kind: 'tcp'; host: string; port: number }
  | { kind: 'unix'; path: string };

export interface ExportProvider {
  /** active exports, for NBD_OPT_LIST */
  list(): ExportInfo[];
  /** info without opening (NBD_OPT_INFO); undefined if unknown */
  info(name: string): ExportInfo | undefined;
  /**
   * open for transmission by the client at `peer` (counts as an opener, named after the
   * client); throws DmError ENXIO if unknown
   */
  open(name: string, peer: NbdPeer): ExportHandle;
}

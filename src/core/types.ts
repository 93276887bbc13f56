/**
 * The contracts between the core and everything that plugs into it: backing devices,
 * targets, target types. Read this file before writing a target.
 */
import type { Bio } from './bio.ts';
import type { Logger } from './log.ts';

/** What a region of a device holds, for NBD BLOCK_STATUS (`base:allocation`). */
export type AllocState = 'data' | 'zero' | 'hole';
export interface Extent {
  sectors: number;
  /** data: may hold anything; zero: allocated, reads as zeroes; hole: unallocated, reads as zeroes */
  state: AllocState;
}

/**
 * A device a target maps onto: an image file, a block device, another mapped device
 * (`dm:NAME`) or a remote NBD export. Opened through `TargetContext.open`, shared by every
 * table in the engine that names it.
 */
export interface BlockDev {
  /** the reference exactly as the table gave it (printed back by status) */
  readonly ref: string;
  /** size in 512-byte sectors */
  readonly sectors: number;
  /** bio.sector is relative to the start of this device; the caller keeps it in range */
  submit(bio: Bio): Promise<void>;
  /**
   * optional allocation map for [sector, sector+sectors); absent = all data. The answer may
   * cover only a leading part of the range (at least one sector): the caller asks again.
   */
  allocation?(sector: number, sectors: number): Promise<Extent[]>;
  /**
   * optional: `requests` more requests were served in this turn of the event loop by one
   * call (joined writes); a device that completes requests synchronously counts them toward
   * its limit per turn as if each had been a call (file-dev.ts SYNC_BURST)
   */
  chargeSyncTurn?(requests: number): void;
  /**
   * optional: every write this device completed stays held by this machine (its page cache,
   * a disk attached to it) until flushed, so that only a power loss or crash of this machine
   * loses it (file-dev.ts heldHere). Absent: false (a `dm:` or `nbd://` device, a wrapper
   * that does not say).
   */
  heldHere?(): boolean;
}

/** A descriptor for an open image file, and its flush state shared across threads. */
export interface SharedFile {
  fd: number;
  state: Int32Array;
}

/** A backing device whose sectors are a file's bytes (image file or block device). */
export interface FileBackedDev extends BlockDev {
  readonly path: string;
  readonly readOnly: boolean;
  /** a new descriptor for the same open file (owned and closed by the caller), and its flush state */
  share(): SharedFile;
}

/** `sectors` sectors of a target mapped 1:1 onto `dev` from sector `offset` on. */
export interface FileSpan {
  readonly sectors: number;
  readonly dev: FileBackedDev;
  readonly offset: number;
}

export type StatusType = 'info' | 'table';

/**
 * A constructed target instance (dm's `struct dm_target` + its private context).
 * Bios given to `map` are already checked: inside the target, 512-aligned, not crossing
 * `maxIoSectors` boundaries, and `bio.sector` is relative to the target's own start.
 */
export interface Target {
  map(bio: Bio): Promise<void>;
  status(type: StatusType): string;
  /** `dmkit message DEV SECTOR …`: returns an optional reply; throws TargetArgError for bad input */
  message?(args: string[]): Promise<string | void> | string | void;
  /** before I/O is queued at suspend (stop background work that issues I/O) */
  presuspend?(): Promise<void> | void;
  /** after in-flight I/O has drained */
  postsuspend?(): Promise<void> | void;
  /** before queued I/O is re-issued on resume */
  resume?(): Promise<void> | void;
  /** table destroyed: stop timers and background work. Devices are released by the core. */
  destroy?(): Promise<void> | void;
  /** split bios so none crosses a multiple of this many sectors from the target start */
  readonly maxIoSectors?: number;
  /**
   * Flushes this target takes (dm's `num_flush_bios`). 0: the core never sends it a flush,
   * neither a device flush nor the flush before a `preflush` bio, so a flush of a table
   * succeeds whatever such a line would do with it (`error`, `zero`: nothing below them to
   * make durable). 1 (default, when absent): one flush bio per flush of the device, which
   * the target passes on to every device below it that its semantics require.
   */
  readonly flushBios?: 0 | 1;
  /** allocation map (relative sectors) for NBD BLOCK_STATUS; absent = all data; may be short as BlockDev's */
  allocation?(sector: number, sectors: number): Promise<Extent[]>;
  /**
   * The whole target as plain file ranges, in order, when every read and write of it is
   * exactly a read or write of those ranges (linear over a file). Lets the NBD connection
   * threads do such I/O themselves; absent or null = I/O must go through `map`.
   */
  fileMap?(): FileSpan[] | null;
  /** status with names for `--json` (the replicator's sites, lag, ring use); absent = the info line only */
  statusJson?(): unknown;
  /** background work (resync, verify) in progress, for `dmkit wait --progress`; null = none */
  progress?(): Progress | null;
}

/** Progress of a target's background work, as the target knows it. */
export interface Progress {
  /** what is running, e.g. 'resync' */
  readonly work: string;
  readonly doneSectors: number;
  readonly totalSectors: number;
}

/**
 * A device's background work as the engine shows it (`DeviceMapper.progress`), measured
 * over the samples it took (progress-meter.ts). Within one run (the same work, without a
 * pause in which none ran) `doneSectors` and `percent` never go down: done only adds what
 * the target's remaining work shrank by, and the total is done + what remains now, so it
 * grows when writes make more work.
 */
export interface ProgressReport extends Progress {
  /** whole percent, never lower than the last one shown in this run; 100 only when nothing remains */
  readonly percent: number;
  /** bytes per second of done work over the last few seconds (0 until measured) */
  readonly rate: number;
  /** seconds until done at that rate; null while the rate is 0 */
  readonly eta: number | null;
}

/**
 * Facts of an event, beside its text, for `dmkit events`. Values are short words or
 * numbers. Known keys: `slink` (a replicator site), `state` (the site's state after the
 * change, as `status --json` names it), `role` ('primary' | 'secondary'), `work`
 * ('resync' | 'verify') with `phase` ('start' | 'done' | 'stopped') and its counts.
 */
export type EventDetail = Readonly<Record<string, string | number | boolean>>;

/** Everything a target constructor may use. */
export interface TargetContext {
  /** the mapped device's name (for messages and logs) */
  readonly device: string;
  /** target start and length in sectors */
  readonly begin: number;
  readonly length: number;
  /** open a device by reference; released automatically when the table is destroyed or ctr fails */
  open(ref: string): Promise<BlockDev>;
  /** raise a device event (dm_table_event): wakes `wait`; `what` says what changed, for `dmkit events` */
  event(what?: string, detail?: EventDetail): void;
  readonly log: Logger;
  /**
   * true while the engine tears every device down (`close`: a daemon stopping): a
   * destructor may then leave state for the next start instead of treating its
   * device as gone for good
   */
  readonly closing?: boolean;
  /**
   * the engine's state directory (the daemon's `--state-dir`), where a target may keep state
   * that must survive restarts (a replication group's role and generation ids); absent for
   * an engine without one
   */
  readonly stateDir?: string;
}

export interface TargetType {
  readonly name: string;
  readonly version: readonly [number, number, number];
  /** dm's ctr: parse args, open devices through ctx, return the instance. Throw TargetArgError. */
  create(ctx: TargetContext, args: string[]): Promise<Target> | Target;
}

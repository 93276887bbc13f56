/**
 * The dirty region log interface (after the kernel's dm-dirty-log.h). A target that keeps
 * several copies of a device (mirror legs, replication sites) divides the device into
 * regions of `regionSize` sectors and asks its log, per region:
 *
 *   - clean / dirty: may a write be in flight there, so that after a crash the copies may
 *     differ? (`markRegion` before writing, `clearRegion` lazily after, `flush` to persist)
 *   - in sync / out of sync: are the copies known to be identical? (resync work, counts)
 *
 * Logs are created only through the registry (`createDirtyLog` in registry.ts); a target
 * never imports an implementation. Every member is called from the single-threaded event
 * loop; the synchronous members never do I/O and never fail. Only `flush` and the
 * suspend/resume hooks do I/O; they reject with a `BlockError` (errno code) whose handling
 * is stated per member. A log that fails its device keeps working in memory, reports the
 * failure in `status('info')` and raises an event through its context.
 */
import type { Logger } from '../core/log.ts';
import type { BlockDev, StatusType } from '../core/types.ts';

/**
 * How a log starts: `default` keeps what a persistent log recorded (a core log starts
 * with every region out of sync); `sync` starts a new log with every region out of sync
 * (full resync); `nosync` starts a new log with every region in sync.
 */
export type SyncMode = 'default' | 'sync' | 'nosync';

/** What a log implementation may use; a subset of the target's `TargetContext` plus a hook. */
export interface DirtyLogContext {
  /** the mapped device's name, for messages */
  readonly device: string;
  /** open a device by reference (released by the core with the table that opened it) */
  open(ref: string): Promise<BlockDev>;
  /** raise a device event: the log calls it once when its device fails */
  event(): void;
  readonly log: Logger;
  /**
   * Make every data write completed so far durable on the devices the log describes.
   * A persistent log calls it before it writes cleared bits, so that a region is never
   * recorded clean before its data is stable. A rejection makes the log assume that
   * every region is dirty (nothing can be recorded clean until the next resume).
   */
  flushData?(): Promise<void>;
}

export interface DirtyLog {
  /** the registered type name (`core`, `disk`, …) */
  readonly type: string;
  /** sectors per region: a power of 2, ≥ 8 */
  readonly regionSize: number;
  /** ⌈target length / regionSize⌉; regions are numbered 0 … regionCount − 1 */
  readonly regionCount: number;

  /**
   * Called when the owning target is resumed (its table goes live, and after every
   * suspend). A persistent log reads its device here, starts a new log if asked to
   * (`sync`/`nosync`, first resume only) or if it finds none, and writes it back; every
   * log restarts its resync search from region 0. May wait. Never rejects: if the device
   * cannot be read or written the log marks itself failed (status `D`/`F`), raises an
   * event and treats every region as out of sync. The caller starts resync afterwards.
   */
  resume(): Promise<void>;
  /**
   * Called at the start of the target's suspend, after the target has stopped its resync.
   * May wait; rejects only on a device error, which the caller logs and ignores (the log
   * state is in status).
   */
  presuspend(): Promise<void>;
  /**
   * Called after in-flight I/O has drained and the caller has cleared idle regions and
   * flushed. May wait; rejections are logged and ignored by the caller.
   */
  postsuspend(): Promise<void>;
  /**
   * The table is being destroyed. Does no I/O (a suspended log is already on disk, and a
   * following table may already use the same log device); releases the type's use count.
   * Never rejects. The log must not be used afterwards.
   */
  destroy(): Promise<void>;

  /**
   * Is the region clean, i.e. recorded as having no write in flight? Any time; no wait.
   * Used by the caller to decide whether a write must mark the region first.
   */
  isClean(region: number): boolean;
  /**
   * Are the copies of this region known to be identical? Any time; no wait. The caller
   * writes an out-of-sync region to its primary copy only, and reads it from there.
   */
  inSync(region: number): boolean;
  /**
   * Record the region dirty, in memory. Called before the first write to a clean region;
   * the caller must `flush` and wait for it before issuing the write. No wait, no error.
   */
  markRegion(region: number): void;
  /**
   * Record the region clean, in memory, once no write is in flight there. Persisted by a
   * later `flush` (which first calls `flushData`). Ignored after a failed `flushData`,
   * until the next resume. No wait, no error.
   */
  clearRegion(region: number): void;
  /**
   * Persist every mark and clear made before this call. Concurrent calls are coalesced:
   * the returned promise settles once a write that started after this call's changes has
   * completed. Resolves at once when nothing changed (core logs always do). Rejects with
   * a `BlockError` when the log device failed (the log is then `D`, or `F` when only the
   * device flush failed); the caller cannot rely on the marks being persistent and decides
   * by policy whether the dependent write may proceed (mirror: it proceeds unless
   * `handle_errors` and `keep_log` are both set, then it fails with EIO).
   */
  flush(): Promise<void>;

  /**
   * The next out-of-sync region that is not being recovered, searching forward from the
   * last one returned (the search restarts at resume), or null when there is none. The
   * region is then "recovering" until `setRegionSync` is called for it. No wait.
   */
  getResyncWork(): number | null;
  /**
   * Record a region in sync or out of sync (ends its recovery if it was recovering).
   * Called after a resync copy (true on success, false on failure) and when a write
   * failed on some copy (false). In memory only: a region set out of sync stays dirty
   * because the caller never clears it. No wait, no error.
   */
  setRegionSync(region: number, inSync: boolean): void;
  /** how many regions are in sync; equals `regionCount` when the copies are identical */
  getSyncCount(): number;

  /**
   * `info`: `1 core` or `3 disk <log_dev> <A|D|F>`; `table`: the log's part of a table
   * line (`core <1|2> <region_size> [sync|nosync]`, `disk <2|3> <log_dev> <region_size>
   * [sync|nosync]`), which `createDirtyLog` accepts back.
   */
  status(type: StatusType): string;
}

/** A registered log implementation. */
export interface DirtyLogType {
  readonly name: string;
  /**
   * Parse the log's own arguments (those after `<type> <#args>`), open its devices through
   * `ctx`, and return the log. `targetLength` (sectors) sets the region count. Throws
   * `TargetArgError` naming the bad argument; whatever it opened is released by the core.
   */
  create(ctx: DirtyLogContext, args: readonly string[], targetLength: number): Promise<DirtyLog> | DirtyLog;
}

/**
 * The replication log interface (replog). A `replicator` owns one log: every write to any
 * device of its group is appended to the log before it reaches the local device, and each
 * site link (slink) ships the log's entries to its site in log order. The log is a ring on
 * disk: entries live on the log device, never accumulate in memory, and are dropped once
 * every slink and the local devices are past them (the *positions* given to `checkpoint`).
 *
 * Logs are created only through the registry (`createReplog` in registry.ts); the
 * replicator never imports an implementation. Every member is called from the
 * single-threaded event loop. Members that do I/O return promises that reject with a
 * `BlockError` (errno code); what the caller does with each code is stated per member.
 *
 * Sequence numbers start at 1 and increase by one per entry with no gaps, for the life of
 * the log (across restarts). Seq 0 means "nothing".
 */
import type { Logger } from '../core/log.ts';
import type { BlockDev, StatusType } from '../core/types.ts';

/** What an entry records. `flush` entries carry no data and mark a flush of the group. */
export type ReplogOp = 'write' | 'discard' | 'write-zeroes' | 'flush';

/** An entry as the replicator appends it. */
export interface AppendEntry {
  /** the device's number in the group (replicator-dev's `dev_nr`), 0 … 255 */
  readonly devNr: number;
  readonly op: ReplogOp;
  /** device-relative sector and length (0/0 for flush) */
  readonly sector: number;
  readonly sectors: number;
  /** the payload for `write` (sectors × 512 bytes); empty otherwise. Not kept by the log after `append` resolves unless copied. */
  readonly data: Buffer;
  /** the group's write epoch (see REPLICATION.md guarantee 2): entries of one epoch may be applied concurrently */
  readonly epoch: number;
  /** the write was FUA (kept for the receiving site) */
  readonly fua: boolean;
}

/** An entry read back from the log. */
export interface ReplogEntry extends AppendEntry {
  readonly seq: number;
  /** wall-clock milliseconds when it was appended (for the fall-behind `timeout` and lag age) */
  readonly time: number;
  /**
   * the payload: may be a view of a buffer the log keeps (a cache of recent entries): the
   * caller must not write into it, and may hold it only until it has shipped it (its ship
   * settled); the log may reuse that memory once the caller says so (`reclaim`)
   */
  readonly data: Buffer;
  /**
   * the CRC32C the log sealed the entry with, as `crc32c(data, seed)` (the seed is the CRC of
   * the entry's header): a transport may carry it to the site instead of computing its own
   * over the payload, so the site checks the bytes against what was logged. Absent when the
   * log type keeps no such CRC.
   */
  readonly payloadCrc?: PayloadCrc;
}

/** `crc32c(payload, seed) === crc` (`@node-rs/crc32`'s continuation form) */
export interface PayloadCrc {
  readonly seed: number;
  readonly crc: number;
}

/** Where one slink stands: every entry with seq ≤ `seq` is shipped to it, or marked in its dirty logs. */
export interface SlinkPosition {
  readonly slink: number;
  readonly seq: number;
  /**
   * `ship`: entries after `seq` are to be shipped in order; `log`: the slink is on its
   * dirty logs, and entries after `seq` are to be marked there (recovery does so)
   */
  readonly mode: 'ship' | 'log';
}

/** The devices that left (CheckpointState.left) a checkpoint holds at most. */
export const CHECKPOINT_MAX_LEFT = 75;

/** The activity-log extents (CheckpointState.activity) a checkpoint holds at most. */
export const CHECKPOINT_MAX_ACTIVE = 490;

/** What the replicator persists in a checkpoint, and gets back from `recover`. */
export interface CheckpointState {
  /** every entry with seq ≤ localDone has completed on its local device */
  readonly localDone: number;
  readonly slinks: readonly SlinkPosition[];
  /**
   * The replicator's epoch counter when it took the state (absent or 0: none kept, as in
   * older logs): recovery starts its epochs above every epoch the lost tail could have used
   */
  readonly epoch?: number;
  /**
   * Slink numbers (0 … 63) whose sites are to be verified whole: they held entries the log
   * lost (src/targets/replicator-lost.ts); absent: none
   */
  readonly verify?: readonly number[];
  /**
   * The machine's boot id when the state was taken (32 hex digits; absent: unknown), and
   * whether the group was quiesced then (suspended: nothing in flight, everything flushed).
   * A log whose newest checkpoint is of another boot and not quiesced was cut off by a
   * power loss or a machine crash: its unflushed tail may be lost.
   */
  readonly boot?: string;
  readonly quiesced?: boolean;
  /** device numbers (0 … 255) of the group's replicator-devs, bound now or not yet after a restart; absent: not kept */
  readonly devices?: readonly number[];
  /**
   * Devices that left the group (removed, or forgotten) while the ring may still keep
   * entries of theirs, each with the head when it left: no site ships, marks or replays
   * their entries up to that seq (a removed device's dirty logs have them), bound again or
   * not (a device number used again is another device). Absent: none
   */
  readonly left?: ReadonlyArray<{ readonly dev: number; readonly seq: number }>;
  /**
   * Device numbers forgotten (the replicator's `forget` message): their sites were not told
   * of their writes since, so when one binds again every site of it is verified whole. Absent: none
   */
  readonly forgotten?: readonly number[];
  /**
   * The replicator's activity log (src/targets/replicator-activity.ts): the extents that may
   * hold writes not yet durable on the local devices or in the log, as keys (device number
   * × 2^24 + extent index), at most CHECKPOINT_MAX_ACTIVE; `incomplete`: writes outside them
   * may be too. After a power loss only those extents are verified at the sites (all of
   * them when incomplete). Absent: not kept (an older log, or the group keeps none): every
   * site is then verified whole
   */
  readonly activity?: { readonly extents: readonly number[]; readonly incomplete: boolean };
}

/** The outcome of opening a log's contents (`recover`). */
export interface Recovered {
  /** the last checkpoint (null for a newly created log) */
  readonly state: CheckpointState | null;
  /** seq of the last valid entry after the scan (0 when empty) */
  readonly head: number;
  /** entries after the checkpoint's oldest position that the scan found valid */
  readonly entries: number;
  /** true when the scan stopped at a torn or corrupt entry (discarded: never acknowledged, or written after the last flush before a power loss) */
  readonly tornTail: boolean;
}

/** Reads entries in seq order from a starting point (a shipper's cursor). */
export interface ReplogReader {
  /** seq of the entry the next `next()` returns */
  readonly seq: number;
  /**
   * The next entry, or null when the reader has reached the head (call again after the
   * next append). May wait (reads the log device unless the entry is cached). Rejects with
   * EIO on a device error or a CRC mismatch (the caller marks the slink down and retries
   * later), and with EOVERFLOW when the entry was already dropped from the ring (the caller
   * falls back to the slink's dirty logs).
   */
  next(): Promise<ReplogEntry | null>;
  /**
   * Optional fast path: the next entry when the log has it in memory (no I/O), returned at
   * once and consumed as `next()` would; null at the head; undefined when it would need a
   * read (then call `next()`). Lets a shipper take a run of entries in one turn of the
   * event loop instead of one per turn.
   */
  tryNext?(): ReplogEntry | null | undefined;
}

export interface Replog {
  /** the registered type name (`ringbuffer`, …) */
  readonly type: string;
  /**
   * the log's identity (hex), the same for its whole life and a new one for a new log:
   * receivers key their applied positions by it, since sequence numbers restart with a log
   */
  readonly uuid: string;
  /**
   * the log's size in sectors from `dev_start`, its header and checkpoints included (the
   * header's: it wins over the table on open). One entry takes at most half of it; the
   * replicator splits writes at a quarter.
   */
  readonly size: number;
  /** seq of the last entry written, every earlier one written too (0 = none yet): what readers can see */
  readonly head: number;
  /** seq of the oldest entry still kept (head + 1 when the ring is empty) */
  readonly tail: number;
  /** sectors of the ring taken by kept entries */
  used(): number;

  /**
   * Called once, at the replicator's first resume, before anything else: reads the last
   * checkpoint and scans the ring from the oldest position it names, CRC-checking every
   * entry, to find the head; a torn or corrupt entry ends the scan (it and anything after
   * it are discarded). May wait. Rejects with EIO when the log device cannot be read (the
   * replicator refuses to resume: its writes cannot be logged).
   */
  recover(): Promise<Recovered>;

  /**
   * Append one entry; resolves with its seq once it and every entry appended before it are
   * written to the log device (not necessarily durable: see `flush`). Seqs are assigned in
   * call order. Never waits for space: rejects at once with ENOSPC when the entry does not
   * fit in the free part of the ring (nothing written; the caller frees space by a
   * checkpoint with advanced positions, or by moving slow slinks to their dirty logs, and
   * calls again), with EINVAL when the entry can never fit (larger than the ring), and with
   * EIO when the log device failed (the caller fails the write).
   */
  append(e: AppendEntry): Promise<number>;

  /** Make every appended entry durable (fdatasync of the log device). Rejects with EIO. */
  flush(): Promise<void>;

  /**
   * Optional. Whether every write the log completed stays held by this machine (its page
   * cache, a disk attached to it) until flushed, so that only a power loss or crash of this
   * machine can lose it: the replicator then detects the loss by the boot id and may
   * checkpoint without flushing the entries first. Asked at each checkpoint; never waits.
   * Absent or false (a log on a remote device): every checkpoint flushes the log first.
   */
  heldHere?(): boolean;

  /**
   * A reader whose first entry is `fromSeq` (tail ≤ fromSeq ≤ head + 1). Throws a
   * `BlockError` EOVERFLOW at once when `fromSeq` is no longer in the ring.
   */
  reader(fromSeq: number): ReplogReader;

  /**
   * Persist `state` (positions the caller has made good: shipped entries flushed on their
   * site, marked entries flushed in the dirty logs, local writes completed up to
   * `localDone`, and flushed unless the log and those devices are held here) and then free the ring space before the oldest position. Checkpoints go
   * to alternating slots, so a torn checkpoint leaves the previous one. Concurrent calls
   * are serialised. May wait. Rejects with EIO (the previous checkpoint still holds;
   * nothing is freed), or EINVAL for a position beyond the head or more than 64 slinks
   * (the caller's bug). After `destroy`, every member rejects with ESHUTDOWN.
   */
  checkpoint(state: CheckpointState): Promise<void>;

  /**
   * Optional. The caller holds no entry whose seq is below `belowSeq` any more: every ship
   * of one has settled and no reader of the caller's is positioned before it. The log may
   * then reuse the memory behind those entries' `data` once they are also behind its tail
   * (no reader can be given them again). Called after each checkpoint; never waits, never
   * throws. A log that does not implement it lets the garbage collector free that memory.
   */
  reclaim?(belowSeq: number): void;

  /**
   * `replog resize <sectors>`: grow or shrink the ring (the log device must hold it; the
   * entries kept must fit). Rejects with EINVAL naming what does not fit.
   */
  resize(sectors: number): Promise<void>;

  /**
   * `info`: `<used>/<size>` sectors; `table`: the replog's arguments as the table gives
   * them after `<type> <#params>` (`<dev> <dev_start> <open-mode> <size>`), which
   * `createReplog` accepts back.
   */
  status(type: StatusType): string;

  /** Stop timers and release the log (no further I/O; the last checkpoint was written by the caller). Never rejects. */
  destroy(): Promise<void>;
}

/** What a log implementation may use. */
export interface ReplogContext {
  /** the control device's name, for messages */
  readonly device: string;
  /** open a device by reference (released by the core with the table that opened it) */
  open(ref: string): Promise<BlockDev>;
  /** raise a device event (the log device failed) */
  event(): void;
  readonly log: Logger;
}

/** A registered log implementation. */
export interface ReplogType {
  readonly name: string;
  /**
   * Parse the log's own arguments (those after `<type> <#params>`), open its device, and
   * validate what is there according to the open mode (open: a valid log must exist;
   * create: make a new one, refusing a valid log in use; auto: open, else create). Throws
   * `TargetArgError` naming the argument or the problem (missing, foreign, corrupted,
   * wrong-version log, and where). Whatever it opened is released by the core.
   */
  create(ctx: ReplogContext, args: readonly string[]): Promise<Replog> | Replog;
}

/**
 * The site link (slink) interface: a transport from a replicator to one site. Slink 0 is the
 * local site; slinks 1 … N are remote. The replicator owns everything that is replication
 * (log order, epochs, policies, fall-behind, dirty logs, resync); a slink only carries I/O
 * to its site's devices and says whether they work. Network transports (nbd, tcp) implement
 * the same interface as `blockdev`, and the slink compliance suite runs against each.
 *
 * Slinks are created only through the registry (`createSlink` in registry.ts). Every member
 * is called from the single-threaded event loop. Promises reject with a `BlockError`
 * (errno code); what the caller does with each is stated per member.
 */
import type { Bio } from '../core/bio.ts';
import type { Logger } from '../core/log.ts';
import type { BlockDev, StatusType } from '../core/types.ts';
import type { Needs } from '../replication/roles.ts';
import type { PayloadCrc } from '../replog/types.ts';
import type { GenIds } from '../targets/replicator-role.ts';

/** A log entry's place in the group's order, handed to `RemoteDevice.submit` by the shipper. */
export interface ShipTag {
  /** the entry's sequence number in the replication log (group-wide, increasing) */
  readonly seq: number;
  /** the entry's epoch: entries of one epoch are concurrent, epochs are applied in order */
  readonly epoch: number;
  /**
   * Optional: the CRC the replication log sealed the entry with. When present, the data of a
   * write submitted with this tag is the entry's payload as logged: crc32c(bio.data, seed)
   * === crc held when it was logged (it fails only if the bytes changed since). A transport
   * may carry it to the site instead of computing a CRC over the data again (tcp, feature
   * 'entry-crc'); the site then checks the bytes against what was logged. Meaningless for a
   * part of the data (a transport that splits a write does not use it) and for other ops.
   */
  readonly payloadCrc?: PayloadCrc;
}

/** What a slink may use: the replicator's context. */
export interface SlinkContext {
  /** the control (replicator) device's name, for messages */
  readonly device: string;
  /**
   * The group's identity: the replication log's uuid. A receiver keys its applied position
   * by it (with the slink number), so a new log starts a new stream.
   */
  readonly groupId: string;
  /** raise an event on the control device (the site went down or came back) */
  event(): void;
  readonly log: Logger;
  /**
   * The group's roles, for transports whose sites judge a sender by its generation ids
   * (tcp: docs/howto/failover.md). Absent for an engine that has none (then the transport
   * sends none, and the site takes the stream as before roles existed).
   */
  readonly roles?: SlinkRoles;
  /**
   * For transports whose sites keep an applied position by seq (tcp), at connect: resolves
   * null when the site's position agrees with the log, or, when the site began entries this
   * log lost (a power loss here before they were flushed; recovery gives their seqs to new
   * entries), with the position the site must take instead (`seq`, `epoch`: it acknowledged
   * every entry up to `seq`, and every later one will be shipped to it). Before resolving,
   * the group has recorded durably that the site is to be verified whole (checksum resync of
   * every region). Absent: sites are not judged.
   */
  judge?(slink: number, site: SitePosition): Promise<{ seq: number; epoch: number } | null>;
}

/** A site's position as it reports it at connect (receiver stream.ts). */
export interface SitePosition {
  /** every entry up to this seq is applied there */
  readonly applied: number;
  /** the epoch it recorded with `applied`: that of entry `applied`, or of the entry that began the next epoch */
  readonly epoch: number;
  /** the highest seq it began (≥ applied; entries above `applied` are of epoch `epoch`) */
  readonly started: number;
}

/** The group's side of roles and generation ids, as a transport sees it. */
export interface SlinkRoles {
  /** a secondary group sends nothing: its transports do not connect */
  secondary(): boolean;
  /** the ids to send with an OPEN on `slink` */
  gens(slink: number): GenIds;
  /**
   * The site took device `devNr`: `resync` is what it judged (`none`: it holds our
   * generation, or is new; `partial`/`full`), `needs` the regions it changed that we lack
   * (a demoted primary's unshipped writes), to copy over them.
   */
  opened(slink: number, devNr: number, resync: 'none' | 'partial' | 'full', needs: Needs | null): void;
  /** the site refused the stream for its role (`peer-primary`, `split-brain`, `unrelated`) */
  refused(slink: number, verdict: string, why: string): void;
}

/** What the group tells a site about itself (SiteLink.announce). */
export interface Announcement {
  /** the group's generation */
  readonly gen: string;
  /** the site holds it in order (false: a resync into it runs, or the sender was demoted) */
  readonly consistent: boolean;
  readonly role: 'primary' | 'secondary';
  /**
   * with role 'secondary': the group demoted with every site holding all it wrote (no region
   * out of sync anywhere): a site promoted next is a planned move, not an unplanned failover
   */
  readonly allInSync?: boolean;
}

/** What attaching one device may use: the replicator-dev's context (its table opens the device). */
export interface SlinkDeviceContext {
  /** the replicator-dev's device name, for messages */
  readonly device: string;
  /** open a device by reference (released by the core with the replicator-dev's table) */
  open(ref: string): Promise<BlockDev>;
  /** the replicator-dev's length in sectors: the remote device must hold it */
  readonly length: number;
}

/**
 * One device at the site. Its `submit` carries writes (with `fua`), discards, write-zeroes
 * and flushes, and reads (resync verification, digests); sectors are relative to the
 * device's start at the site. It is a `BlockDev`, so the copy service can resync into it.
 */
export interface RemoteDevice extends BlockDev {
  /** the group's device number */
  readonly devNr: number;
  /**
   * Any I/O. Resolves when the site has it (a write with `fua`, and a flush, once it is
   * durable there). Rejects with EIO (or ENXIO, ETIMEDOUT, ECONNRESET … for network
   * transports) when the site failed it: the replicator marks the slink down, keeps the
   * entry for a later retry and retests the slink. May wait as long as the transport's own
   * timeouts allow, never forever.
   *
   * `tag` comes with every entry shipped from the log (its group-wide sequence number and
   * epoch); resync copies and tests come without one. A transport whose receiver persists
   * its applied position (tcp) uses it to apply each entry exactly once and in order across
   * reconnects and crashes; the others ignore it.
   */
  submit(bio: Bio, tag?: ShipTag): Promise<void>;
  /**
   * Optional: the site applies the tagged entries it is given in epoch order by itself, and
   * refuses later epochs after one of its entries failed (tcp to a receiver with the
   * feature 'pipeline': the transport keeps entries in log order and the receiver holds a
   * later epoch until the one before is applied). Read by the shipper at every epoch
   * boundary: while true it sends the next epoch's entries without waiting for the previous
   * one's acknowledgements; absent or false (blockdev, nbd, a tcp link not connected or to
   * an older receiver), it waits, a round trip per epoch. A transport that sets it must
   * implement `restart`.
   */
  readonly ordersEpochs?: boolean;
  /**
   * Optional, with `ordersEpochs`: the shipper's generation `generation` starts shipping
   * with entry `seq`, and every entry it handed over before has been answered (it knows
   * which failed: those below `seq` not applied are in its dirty logs; the others come
   * again from `seq` on). Called before the generation's first entry to each device; a
   * transport whose devices share one ordered stream tells its site once per generation,
   * before that entry, so that a failed entry stops holding later epochs back. It must not
   * tell it again later in the generation: an entry of the generation may have failed.
   */
  restart?(seq: number, generation: number): void;
  /**
   * Does the device work again? Called by the replicator's retest timer after a failure.
   * Resolves when it does (e.g. a flush succeeded); rejects with the reason otherwise.
   */
  test(): Promise<void>;
  /**
   * Optional: the digests of `sectors` sectors from `sector` on, in blocks of `blockSectors`
   * (a power of two, at least 8), computed at the site (checksum resync and verify): 16
   * bytes per block, xxh3-128 as `digestBlocks` (core/digest.ts) makes them, the last
   * block possibly short. Absent: the replicator reads the site's blocks through `submit`
   * and compares them with its own byte for byte; rejecting with ENOTSUP (a site that does
   * not offer them): it reads them through `submit` and hashes them itself. Other
   * rejections as for `submit`.
   */
  digest?(sector: number, sectors: number, blockSectors: number): Promise<Buffer>;
  /** the replicator-dev's `<dev_params…>` for this device (status table), e.g. `['/img/b.img']` */
  params(): string[];
  /**
   * The replicator-dev's table is destroyed. No I/O is in flight. Never rejects. `closing`:
   * the engine is stopping (a daemon shutting down) and the device stays replicated, so a
   * transport keeps what it holds at the site (tcp: the receiving device stays secondary);
   * otherwise the device leaves this site for good, or a reloaded table replaces it.
   */
  detach(closing?: boolean): Promise<void>;
}

export interface SiteLink {
  /** the registered type name as the table gave it (`blockdev`, `local`, …) */
  readonly type: string;
  /** the slink number: 0 local, 1 … N remote */
  readonly slink: number;
  /**
   * false when a ship completes without a network round trip (`blockdev`: cached file
   * writes complete on the spot); absent or true otherwise. A write waiting for a synchronous
   * site across a network lets the entry go out before its own local write.
   */
  readonly overNetwork?: boolean;
  /** how long after a failure the replicator calls `test()` again, in milliseconds */
  readonly retestMs: number;
  /**
   * replicator-dev's constructor: open the site's device from `params` (the tuple's
   * `<dev_params…>`) through `ctx`. Throws `TargetArgError` naming the bad parameter, or
   * when the device cannot be opened or is smaller than `ctx.length` ("device too small").
   */
  attach(ctx: SlinkDeviceContext, devNr: number, params: readonly string[]): Promise<RemoteDevice>;
  /**
   * The transport options as `key=value` words for the replicator's status table (those
   * given, in their order; empty when none), which `createSlink` accepts back.
   */
  options(): string[];
  /** `info` part of the replicator's per-slink status (may be empty): transport state such as a peer address */
  status(type: StatusType): string;
  /**
   * Optional: the transport's state for `status --json` (connection, bytes on the wire,
   * compression ratio, last error …), with names.
   */
  statusJson?(): Record<string, unknown> | undefined;
  /**
   * Optional: tell the site the group's generation and whether it holds it in order (tcp
   * sends a STATE frame; fire and forget: the next OPEN carries it again). A transport
   * without roles has no use for it.
   */
  announce?(a: Announcement): void;
  /** The replicator's table is destroyed: close connections, stop timers. Never rejects. */
  destroy(): Promise<void>;
}

/** A registered transport. */
export interface SiteLinkType {
  readonly name: string;
  /** other names the table may use (blockdev: `local`) */
  readonly aliases?: readonly string[];
  /**
   * Create the slink from its number and transport options (`key=value` words of the
   * slink's parameters, in order, already split from policy and fall-behind). Throws
   * `TargetArgError` naming an unknown key or a bad value.
   */
  create(ctx: SlinkContext, slink: number, options: readonly string[]): Promise<SiteLink> | SiteLink;
}

/** Synchronous or asynchronous shipping, and what an async slink does when it falls behind. */
export interface SlinkPolicy {
  readonly mode: 'sync' | 'async';
  /** `+stall`: block writers; `+pull-ahead`: go to the dirty logs; none: switch to synchronous */
  readonly onFallBehind: 'sync' | 'stall' | 'pull-ahead';
}

/** A fall-behind threshold: outstanding ios, outstanding sectors, or age of the oldest unshipped entry. */
export type FallBehind =
  | { readonly kind: 'ios'; readonly value: number }
  | { readonly kind: 'size'; readonly sectors: number; readonly text: string }
  | { readonly kind: 'timeout'; readonly ms: number; readonly text: string };

/** A slink's parameters from the replicator's table: `<slink#> [<policy> [<fallbehind>]] [<key>=<value>…]`. */
export interface SlinkParams {
  readonly slink: number;
  readonly policy: SlinkPolicy;
  /** the policy as written (`async+pull-ahead`), for status table; null when left out */
  readonly policyText: string | null;
  readonly fallBehind: FallBehind | null;
  /** the fall-behind as written (`size 64m`, `ios=100`), for status table */
  readonly fallBehindText: string | null;
  /** transport `key=value` words, in order */
  readonly options: readonly string[];
}

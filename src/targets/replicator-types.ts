/**
 * What the replicator's parts share: a device of the group as bound by its replicator-dev
 * (local device, per-site remote devices and dirty logs, the region gate), and the group's
 * side of a site (`SiteHost`).
 */
import type { RegionGate } from '../core/copy.ts';
import type { Logger } from '../core/log.ts';
import type { BlockDev, EventDetail } from '../core/types.ts';
import type { DirtyLog } from '../dirtylog/types.ts';
import type { Replog } from '../replog/types.ts';
import type { RemoteDevice } from '../slink/types.ts';
import type { GroupRole } from './replicator-role.ts';
import type { ResyncControl } from './resync-control.ts';

/** One device of the group at one remote site. */
export interface SiteDev {
  readonly dev: RemoteDevice;
  readonly dlog: DirtyLog;
}

/** A device of the group, bound by its live replicator-dev. */
export interface DevBinding {
  readonly devNr: number;
  /** the replicator-dev's device name */
  readonly name: string;
  /** length in sectors */
  readonly length: number;
  /** the local device (slink 0) */
  readonly local: BlockDev;
  /** per remote slink number */
  readonly remotes: ReadonlyMap<number, SiteDev>;
  /** writes against resync copies, region by region (region size of the dirty logs) */
  readonly gate: RegionGate | null;
  /** raise an event on the replicator-dev's device (a site's state changed) */
  event(what?: string, detail?: EventDetail): void;
}

/** The group as a site sees it. */
export interface SiteHost {
  readonly log: Replog;
  readonly logger: Logger;
  /** seq of the last entry appended */
  readonly head: number;
  /** sectors appended since start */
  readonly appendedSectors: number;
  /** the group's role and generation ids (a secondary ships nothing and resyncs nothing) */
  readonly role: GroupRole;
  /** resync rate control: the mode (`resync-rate`) and the group's application writes */
  readonly resyncControl: ResyncControl;
  /** wall-clock ms when `seq` was appended (approximate for old entries) */
  appendTime(seq: number): number;
  binding(devNr: number): DevBinding | null;
  bindings(): Iterable<DevBinding>;
  /** the bound devices and those being removed (their backlog still shipped or marked) */
  bindingsAndLeaving(): Iterable<DevBinding>;
  /** resolves when `devNr` is bound */
  whenBound(devNr: number): Promise<void>;
  /** the group's devices not bound (after a restart some may not be yet: their regions are not known here); [] when all are */
  unbound(): number[];
  /** hold new writes before they are logged; resolves once those being logged are; returns the release */
  hold(): Promise<() => void>;
  /** a state change: logged and raised as a device event (`detail`: the site's slink and state, counts) */
  event(what: string, detail?: EventDetail): void;
  /**
   * A site changed mode: checkpoint now rather than at the next tick, so that a crash soon
   * after does not restart it in the old mode (a site back in order after a resync would
   * mark and resync again what it shipped meanwhile). Never waits, never throws.
   */
  checkpointSoon(): void;
}

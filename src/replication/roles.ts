/**
 * Which of the receiver's devices receive which stream (they are secondary: EROFS for
 * their other writers), kept in `<state>/replication/roles.json` so that a restarted
 * receiver makes them secondary again before anything listens.
 */
import fs from 'node:fs';
import { writeAtomicSync } from '../core/atomic-file.ts';
import type { Logger } from '../core/log.ts';
import type { GroupRole } from '../targets/replicator-role.ts';

export const ROLE = 'replication stream ';
/** a secondary device's owner label for stream `id` (MappedDevice.secondary) */
export function roleOf(id: string): string {
  return `${ROLE}${id}`;
}

export function readRoles(file: string, log: Logger): Map<string, string> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return new Map();
  }
  try {
    const o = JSON.parse(text) as Record<string, unknown>;
    return new Map(Object.entries(o).filter((e): e is [string, string] => typeof e[1] === 'string'));
  } catch (err) {
    log.error(`replication: ${file}: unreadable (${(err as Error).message}); no device is secondary until its sender reconnects`);
    return new Map();
  }
}

/** write the roles atomically and durably (a power loss leaves the old roles or the new) */
export function writeRoles(file: string, roles: ReadonlyMap<string, string>): void {
  writeAtomicSync(file, `${JSON.stringify(Object.fromEntries(roles), null, 1)}\n`);
}

/** regions a receiving device asks a new primary to overwrite: bit i = region i (of `regionSectors`) */
export interface Needs {
  readonly regionSectors: number;
  readonly bits: Buffer;
}

/** What the receiver sees of a device that is itself a replicator-dev (it has a group role). */
export interface ReplicatedDevice {
  readonly role: GroupRole;
  /** the group's control device name, for messages */
  readonly group: string;
  /** regions changed here that no site has (written as primary and never shipped), null when none */
  needs(): Needs | null;
  /** a primary's resync has overwritten them: forget them */
  clearNeeds(): Promise<void>;
}

/** the group role of a device whose table is a replicator-dev (or a replicator), else null */
export function replicatedDevice(dev: { liveTarget?(sector: number): unknown }): ReplicatedDevice | null {
  const t = dev.liveTarget?.(0) as { replication?: ReplicatedDevice } | null | undefined;
  return t?.replication ?? null;
}

/** the secondary label of a demoted replicator-dev (no stream yet: the next primary takes it over) */
export const DEMOTED = 'replication role: demoted';

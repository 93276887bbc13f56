/**
 * `dmkit promote` and `dmkit demote` (docs/howto/failover.md): a replication group's role
 * moves, with its devices' secondary marks (EROFS for their other writers) and the
 * receiver's streams kept in step. NAME is the group's `replicator` device or any of its
 * replicator-devs; a plain receiving device can be promoted too (it stops receiving and is
 * writable; without a group nothing tracks its writes, so a failback copies it whole).
 */
import type { DeviceMapper } from '../core/device-manager.ts';
import { DeviceError } from '../core/errors.ts';
import { ReplicatorGroup } from '../targets/replicator-group.ts';
import type { ReplicationReceiver } from './receiver.ts';
import { DEMOTED, replicatedDevice } from './roles.ts';

export interface RoleResult {
  readonly group: string | null;
  readonly role: 'primary' | 'secondary';
  readonly generation: string | null;
  readonly devices: string[];
}

/** the group of device `name` (its replicator, or the one its replicator-dev names), or null */
function groupOf(dm: DeviceMapper, name: string): { control: string; group: ReplicatorGroup } | null {
  const dev = dm.get(name);
  const t = dev.liveTarget(0);
  if (t instanceof ReplicatorGroup) return { control: name, group: t };
  const rep = replicatedDevice(dev);
  if (!rep) return null;
  const g = dm.get(rep.group).liveTarget(0);
  return g instanceof ReplicatorGroup ? { control: rep.group, group: g } : null;
}

function devicesOf(group: ReplicatorGroup): string[] {
  return [...group.bindings()].map((b) => b.name);
}

/**
 * Make the group primary: writable at once, a new generation, its dirty logs recording
 * every write from now on. Refused while a connected primary still sends to it (EBUSY) or
 * while it is inconsistent (EPERM), unless `force`.
 */
export async function promote(dm: DeviceMapper, name: string, opts: { force?: boolean; receiver?: ReplicationReceiver | null } = {}): Promise<RoleResult> {
  const force = !!opts.force;
  const g = groupOf(dm, name);
  const names = g ? devicesOf(g.group) : [name];
  if (g && !g.group.role.secondary) throw new DeviceError('EBUSY', `${g.control}: already primary (generation ${g.group.role.current})`);
  if (!g && dm.get(name).secondary === null) throw new DeviceError('EINVAL', `${name}: not secondary and not part of a replication group: nothing to promote`);
  // a planned move: the old primary demoted with every site in sync (asked before the streams go)
  const planned = names.every((n) => opts.receiver?.plannedMove(n) ?? false);
  // stop receiving first: nothing applied from the old primary after the new generation
  // starts (no connection opens them meanwhile; writes in flight finish, later ones fail)
  opts.receiver?.fence(names);
  try {
    for (const n of names) await opts.receiver?.release(n, force);
    if (g) await g.group.promote(force, planned);
    for (const n of names) {
      await dm.get(n).clearSecondary();
      opts.receiver?.setRole(n, null);
    }
  } finally {
    opts.receiver?.unfence(names);
  }
  return { group: g?.control ?? null, role: 'primary', generation: g?.group.role.current ?? null, devices: names };
}

/**
 * Make the group secondary: its devices refuse writes (EROFS) from now on, what its sites
 * have not taken goes to the dirty logs, and the next primary that connects overwrites
 * those regions here. `discard`: this side's changes go (the split-brain resolution).
 */
export async function demote(dm: DeviceMapper, name: string, opts: { discard?: boolean; receiver?: ReplicationReceiver | null } = {}): Promise<RoleResult> {
  const g = groupOf(dm, name);
  if (!g) throw new DeviceError('EINVAL', `${name}: not a replicator or replicator-dev: only a replication group has a role to give up`);
  if (!opts.receiver) {
    throw new DeviceError('EINVAL', `${g.control}: this daemon receives no replication (start it with --replication-listen and --replication-secret): a secondary would have nobody to take data from`);
  }
  const names = devicesOf(g.group);
  for (const n of names) {
    const dev = dm.get(n);
    if (dev.secondary === null) await dev.setSecondary(DEMOTED);
  }
  await g.group.demote(!!opts.discard);
  return { group: g.control, role: 'secondary', generation: g.group.role.current, devices: names };
}

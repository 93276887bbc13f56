/**
 * replicator-dev: one device of a replication group. Binds the local device (slink 0) and
 * one device per remote slink, each remote with its own dirty log, to the group's
 * `replicator` control device; writes go through the group's log, reads to the local
 * device.
 */
import { allInSync } from './dirty-regions.ts';
import { ArgReader } from '../core/args.ts';
import type { Bio } from '../core/bio.ts';
import { EMPTY } from '../core/bio.ts';
import { RegionGate } from '../core/copy.ts';
import { TargetArgError } from '../core/errors.ts';
import type { BlockDev, Progress, StatusType, Target, TargetContext, TargetType } from '../core/types.ts';
import { createDirtyLog } from '../dirtylog/registry.ts';
import type { DirtyLog, DirtyLogContext } from '../dirtylog/types.ts';
import type { RemoteDevice, SlinkDeviceContext } from '../slink/types.ts';
import { ReplicatorGroup } from './replicator-group.ts';
import type { DevBinding, SiteDev } from './replicator-types.ts';
import type { Needs, ReplicatedDevice } from '../replication/roles.ts';

const MAX_DEV_NR = 255;
const FLUSH: Bio = { op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} };

interface Tuple {
  slink: number;
  dev: RemoteDevice;
  /** null for slink 0 */
  dlog: DirtyLog | null;
  /** slink 0's log words as given (`nolog 0` or `- 0`) */
  nolog: string;
}

/** `dm:NAME` of a live replicator → its group */
async function openGroup(ctx: TargetContext, r: ArgReader): Promise<{ group: ReplicatorGroup; ref: string }> {
  const ref = r.next('replicator device');
  if (!ref.startsWith('dm:')) r.fail(`invalid replicator device '${ref}' (expected dm:NAME of a replicator device)`);
  let dev: BlockDev;
  try {
    dev = await ctx.open(ref);
  } catch (err) {
    throw new TargetArgError((err as Error).message, (err as { code?: string }).code ?? 'EINVAL');
  }
  const target = (dev as { liveTarget?: (s: number) => Target | null }).liveTarget?.(0);
  if (!(target instanceof ReplicatorGroup)) r.fail(`${ref} is not an active replicator device`);
  return { group: target, ref };
}

async function parseTuple(ctx: TargetContext, r: ArgReader, group: ReplicatorGroup, devNr: number, seen: Set<number>): Promise<Tuple> {
  const slink = r.uint('slink number');
  if (seen.has(slink)) r.fail(`slink ${slink} is given twice`);
  seen.add(slink);
  const link = slink === 0 ? group.local : group.siteOf(slink)?.link;
  if (!link) r.fail(`no slink ${slink} in ${ctx.device}'s replicator (slinks: 0${group.sites.map((s) => `, ${s.slink}`).join('')})`);
  const params = r.group(`slink ${slink} device parameters`, { min: 1 });
  const devCtx: SlinkDeviceContext = { device: ctx.device, open: (ref) => ctx.open(ref), length: ctx.length };
  const dev = await link.attach(devCtx, devNr, params);
  const logType = r.next(`slink ${slink} dirty log type`);
  if (slink === 0) {
    if (logType !== 'nolog' && logType !== '-') r.fail(`slink 0 is the local site: its dirty log must be 'nolog 0' or '- 0' (got '${logType}')`);
    const n = r.next('slink 0 dirty log parameter count');
    if (n !== '0') r.fail(`slink 0 is the local site: its dirty log takes no parameters (expected '${logType} 0', got '${logType} ${n}')`);
    return { slink, dev, dlog: null, nolog: `${logType} 0` };
  }
  const logArgs = r.group(`slink ${slink} dirty log parameters`);
  const logCtx: DirtyLogContext = {
    device: ctx.device,
    open: (ref) => ctx.open(ref),
    event: () => ctx.event(),
    log: ctx.log,
    flushData: () => dev.submit(FLUSH),
  };
  try {
    const dlog = await createDirtyLog(logType, logCtx, logArgs, ctx.length);
    return { slink, dev, dlog, nolog: '' };
  } catch (err) {
    await dev.detach();
    // name the tuple, as the slink's own errors do
    throw new TargetArgError(`slink ${slink}: dirty log: ${(err as Error).message}`, (err as { code?: string }).code);
  }
}

/** the union of the device's out-of-sync regions over its remote slinks (what a new primary must overwrite here) */
function needsOf(tuples: readonly Tuple[]): Needs | null {
  const logs = tuples.flatMap((t) => (t.dlog ? [t.dlog] : []));
  const first = logs[0];
  if (!first || logs.every((l) => l.getSyncCount() === l.regionCount)) return null;
  const bits = Buffer.alloc(Math.ceil(first.regionCount / 8));
  for (let i = 0; i < first.regionCount; i++) {
    if (logs.some((l) => !l.inSync(i))) bits[i >> 3]! |= 1 << (i & 7);
  }
  return { regionSectors: first.regionSize, bits };
}

class ReplicatorDev implements Target {
  readonly maxIoSectors: number;
  readonly #ctx: TargetContext;
  readonly #group: ReplicatorGroup;
  readonly #ref: string;
  readonly #devNr: number;
  readonly #tuples: Tuple[];
  readonly #binding: DevBinding;
  #state: 'new' | 'active' | 'suspended' = 'new';

  constructor(ctx: TargetContext, group: ReplicatorGroup, ref: string, devNr: number, tuples: Tuple[]) {
    this.#ctx = ctx;
    this.#group = group;
    this.#ref = ref;
    this.#devNr = devNr;
    this.#tuples = tuples;
    const remotes = new Map<number, SiteDev>();
    for (const t of tuples) if (t.dlog) remotes.set(t.slink, { dev: t.dev, dlog: t.dlog });
    const region = [...remotes.values()][0]?.dlog.regionSize;
    // bios never cross a region (one region per log entry and gate), nor exceed what one log entry takes
    this.maxIoSectors = Math.min(region ?? Infinity, group.maxEntrySectors);
    const local = tuples.find((t) => t.slink === 0)!.dev;
    this.#binding = { devNr, name: ctx.device, length: ctx.length, local, remotes, gate: region ? new RegionGate(region) : null, event: (what, detail) => ctx.event(what, detail) };
  }

  map(bio: Bio): Promise<void> {
    // secondary: the device is marked so (MappedDevice.setSecondary) and only the replication
    // receiver writes; what it applies is another group's stream, not logged here
    if (bio.op === 'read' || this.#group.role.secondary) return this.#binding.local.submit(bio);
    return this.#group.write(this.#binding, bio);
  }

  /** the receiving side's view of this device (src/replication/roles.ts ReplicatedDevice) */
  get replication(): ReplicatedDevice {
    return (this.#replication ??= this.#makeReplication());
  }

  #replication: ReplicatedDevice | null = null;

  #makeReplication(): ReplicatedDevice {
    const tuples = this.#tuples;
    const group = this.#group;
    return {
      role: group.role,
      group: group.ctx.device,
      needs: () => needsOf(tuples),
      async clearNeeds(): Promise<void> {
        for (const t of tuples) {
          if (!t.dlog || t.dlog.getSyncCount() === t.dlog.regionCount) continue;
          allInSync(t.dlog);
          await t.dlog.flush();
        }
      },
    };
  }

  async resume(): Promise<void> {
    if (this.#state === 'active') return;
    if (this.#state === 'new') for (const t of this.#tuples) await t.dlog?.resume();
    await this.#group.bind(this.#binding);
    this.#state = 'active';
  }

  async postsuspend(): Promise<void> {
    for (const t of this.#tuples) await t.dlog?.flush().catch(() => undefined);
    this.#state = 'suspended';
  }

  async destroy(): Promise<void> {
    // the engine stopping: the device stays in the group (restored at the next start), its sites keep their positions
    if (this.#ctx.closing) await this.#group.detach(this.#binding);
    else await this.#group.unbind(this.#binding);
    for (const t of this.#tuples) {
      await t.dlog?.flush().catch(() => undefined);
      await t.dlog?.destroy();
      await t.dev.detach(!!this.#ctx.closing);
    }
  }

  status(type: StatusType): string {
    const parts: string[] = [];
    if (type === 'info') {
      for (const t of this.#tuples) {
        if (!t.dlog) {
          parts.push('A,1/1');
          continue;
        }
        const site = this.#group.siteOf(t.slink);
        const ch = !site || !site.up || site.paused ? 'D' : site.mode === 'log' ? 'R' : 'A';
        const plus = site?.resyncing ? '+' : '';
        parts.push(`${ch},${t.dlog.getSyncCount()}${plus}/${t.dlog.regionCount}`);
      }
      return parts.join(' ');
    }
    parts.push(this.#ref, String(this.#devNr));
    for (const t of this.#tuples) {
      const p = t.dev.params();
      parts.push(String(t.slink), String(p.length), ...p, t.dlog ? this.#dlogTable(t.dlog) : t.nolog);
    }
    return parts.join(' ');
  }

  /** resync of this device at the sites in dirty-log mode: regions in sync × region size */
  progress(): Progress | null {
    let done = 0;
    let total = 0;
    for (const t of this.#tuples) {
      const site = t.dlog ? this.#group.siteOf(t.slink) : undefined;
      if (!t.dlog || !site || site.mode !== 'log') continue;
      done += t.dlog.getSyncCount() * t.dlog.regionSize;
      total += t.dlog.regionCount * t.dlog.regionSize;
    }
    return total > 0 ? { work: 'resync', doneSectors: done, totalSectors: total } : null;
  }

  /**
   * A remote's dirty log as the table shows it. `sync`/`nosync` start a new log: once the
   * log is live they have done that, and the table (which the daemon saves and loads again
   * at restart) no longer says it, so a restart keeps what the log recorded instead of
   * declaring every region in sync (nosync) or out of sync (sync) again.
   */
  #dlogTable(dlog: DirtyLog): string {
    const text = dlog.status('table');
    if (this.#state === 'new') return text;
    const m = /^(\S+) (\d+) (.*) (?:sync|nosync)$/.exec(text);
    return m ? `${m[1]} ${Number(m[2]) - 1} ${m[3]}` : text;
  }

  /** the group (its `dm:NAME`) and each remote site's dirty log, for the HTTP heat map */
  dirtyLogs(): { replicator: string; sites: Array<{ slink: number; dlog: DirtyLog }> } {
    const sites = this.#tuples.flatMap((t) => (t.dlog ? [{ slink: t.slink, dlog: t.dlog }] : []));
    return { replicator: this.#ref, sites };
  }

  statusJson(): unknown {
    return {
      replicator: this.#ref,
      devNr: this.#devNr,
      sites: this.#tuples.map((t) => {
        if (!t.dlog) return { slink: 0, device: t.dev.ref, state: 'local' };
        const site = this.#group.siteOf(t.slink);
        return {
          slink: t.slink,
          device: t.dev.ref,
          state: !site || !site.up || site.paused ? 'down' : site.mode === 'log' ? 'resyncing' : 'in-sync',
          inSyncRegions: t.dlog.getSyncCount(),
          regions: t.dlog.regionCount,
          regionSectors: t.dlog.regionSize,
          dirtyLog: t.dlog.status('info'),
        };
      }),
    };
  }
}

export const replicatorDev: TargetType = {
  name: 'replicator-dev',
  version: [1, 0, 0],
  /**
   * `<replicator> <dev_nr> (<slink#> <#dev_params> <dev_params…> <dlog_type> <#dlog_params> <dlog_params…>){1..N}`
   *   replicator  dm:NAME of the group's replicator device
   *   dev_nr      0 … 255, the device's number in the group (in every log entry)
   *   slink 0     the local device: `0 1 <dev> nolog 0` (or `- 0`)
   *   slink N     the site's device (blockdev: `1 <dev>`) and its dirty log:
   *               core <1|2> <region> [sync|nosync] | disk <2|3> <log_dev> <region> [sync|nosync]
   *               region size the same for every remote slink of the device
   */
  async create(ctx: TargetContext, args: string[]): Promise<Target> {
    const r = new ArgReader(args, 'replicator-dev');
    const { group, ref } = await openGroup(ctx, r);
    const devNr = r.uint('device number', { max: MAX_DEV_NR });
    const owner = group.boundName(devNr);
    if (owner !== null && owner !== ctx.device) r.fail(`device number ${devNr} is already used by ${owner} in ${ref}`);
    const tuples: Tuple[] = [];
    const seen = new Set<number>();
    try {
      while (!r.atEnd()) tuples.push(await parseTuple(ctx, r, group, devNr, seen));
      if (!seen.has(0)) r.fail('missing slink 0 (the local device: 0 1 <dev> nolog 0)');
      const sizes = new Set(tuples.flatMap((t) => (t.dlog ? [t.dlog.regionSize] : [])));
      if (sizes.size > 1) r.fail(`region sizes differ between slinks (${[...sizes].join(', ')}): every remote slink of a device takes the same region size`);
      return new ReplicatorDev(ctx, group, ref, devNr, tuples);
    } catch (err) {
      for (const t of tuples.reverse()) {
        await t.dlog?.destroy();
        await t.dev.detach();
      }
      throw err;
    }
  },
};

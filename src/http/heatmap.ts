/**
 * The heat map of the status page: for each device of a replication group and each remote
 * site, its dirty log's regions folded into at most `cells` cells, each the fraction
 * (0…1) of its regions out of sync at that site (to be resynced). Asked of a replicator,
 * it covers every replicator-dev of the group; of a replicator-dev, that device.
 */
import type { DeviceMapper } from '../core/device-manager.ts';
import { DeviceError } from '../core/errors.ts';
import type { MappedDevice } from '../core/mapped-device.ts';
import type { DirtyLog } from '../dirtylog/types.ts';

interface DirtyLogSource {
  dirtyLogs(): { replicator: string; sites: Array<{ slink: number; dlog: DirtyLog }> };
}

export interface HeatSite {
  slink: number;
  regions: number;
  regionSectors: number;
  outOfSync: number;
  /** fraction out of sync per cell, rounded to 1/1000 */
  cells: number[];
}
export interface HeatDevice { device: string; replicator: string; sites: HeatSite[] }

function source(d: MappedDevice): DirtyLogSource | null {
  const e = d.live?.entries.find((x) => x.type.name === 'replicator-dev');
  const t = e?.target as Partial<DirtyLogSource> | undefined;
  return t && typeof t.dirtyLogs === 'function' ? (t as DirtyLogSource) : null;
}

function fold(dlog: DirtyLog, cells: number): HeatSite['cells'] {
  const n = dlog.regionCount;
  const count = Math.max(1, Math.min(cells, n));
  const out: number[] = [];
  for (let c = 0; c < count; c++) {
    const first = Math.floor((c * n) / count);
    const last = Math.floor(((c + 1) * n) / count);
    let dirty = 0;
    for (let r = first; r < last; r++) if (!dlog.inSync(r)) dirty++;
    out.push(last > first ? Math.round((dirty / (last - first)) * 1000) / 1000 : 0);
  }
  return out;
}

function heatOf(name: string, logs: ReturnType<DirtyLogSource['dirtyLogs']>, cells: number): HeatDevice {
  return {
    device: name,
    replicator: logs.replicator.replace(/^dm:/, ''),
    sites: logs.sites.map(({ slink, dlog }) => ({
      slink, regions: dlog.regionCount, regionSectors: dlog.regionSize, outOfSync: dlog.regionCount - dlog.getSyncCount(), cells: fold(dlog, cells),
    })),
  };
}

/** the heat map of device `name` (a replicator: all its group's devices) */
export function heatmap(dm: DeviceMapper, name: string, cells: number): { device: string; devices: HeatDevice[] } {
  const d = dm.get(name);
  const own = source(d);
  if (own) return { device: name, devices: [heatOf(name, own.dirtyLogs(), cells)] };
  if (!d.live?.entries.some((e) => e.type.name === 'replicator')) {
    throw new DeviceError('EINVAL', `${name}: no heat map: the device is neither a replicator nor a replicator-dev`);
  }
  const devices: HeatDevice[] = [];
  for (const x of dm.list()) {
    const logs = source(x)?.dirtyLogs();
    if (logs?.replicator === d.ref) devices.push(heatOf(x.name, logs, cells));
  }
  return { device: name, devices };
}

/**
 * dmkit as a library: `import { DeviceMapper } from 'dmkit'`.
 * An engine in-process, with the built-in targets registered; no daemon needed.
 */
import { DeviceMapper as CoreDeviceMapper } from './core/device-manager.ts';
import type { TargetType } from './core/types.ts';
import { builtinTargets } from './targets/index.ts';
import { nbdResolver } from './nbd/resolver.ts';
import { loadPlugin } from './plugin.ts';

export class DeviceMapper extends CoreDeviceMapper {
  /** `stateDir`: where targets keep state across restarts (a replication group's role and generation ids) */
  constructor(opts: { targets?: readonly TargetType[]; stateDir?: string } = {}) {
    super({ targets: opts.targets ?? builtinTargets, stateDir: opts.stateDir });
    // nbd://, nbd+unix://, nbds:// … device references (the engine as an NBD client)
    this.addResolver(nbdResolver());
  }

  /**
   * Load a plugin module from anywhere on disk: target types into this engine, dirty log
   * types, slinks and replogs into their registries (src/plugin.ts has the module shapes).
   * The plugin may `import … from 'dmkit'`. Returns what it registered (target type names;
   * `dirtylog:NAME`, `slink:NAME`, `replog:NAME`); all or nothing.
   */
  loadPlugin(modulePath: string): Promise<string[]> {
    return loadPlugin(this, modulePath);
  }
}

export { builtinTargets };
export type { DeviceInfo, DeviceResolver, TableLineOut } from './core/device-manager.ts';
export { MappedDevice } from './core/mapped-device.ts';
export { BlockError, DmError, TableError, TargetArgError, DeviceError } from './core/errors.ts';
export { ArgReader } from './core/args.ts';
export { copyRanges, RegionGate } from './core/copy.ts';
export { createDirtyLog, registerDirtyLog, unregisterDirtyLog, listDirtyLogs } from './dirtylog/registry.ts';
export { registerSlink, unregisterSlink, listSlinks } from './slink/registry.ts';
export { registerReplog, unregisterReplog, listReplogs } from './replog/registry.ts';
export { NbdClient } from './nbd/client.ts';
export { nbdResolver } from './nbd/resolver.ts';
export type { CopyProgress, CopyOptions } from './core/copy.ts';
export type { Bio, BioOp, BioFlags } from './core/bio.ts';
export type { BlockDev, Target, TargetType, TargetContext, Extent, AllocState, StatusType, EventDetail, Progress, ProgressReport } from './core/types.ts';
export type { DeviceEvent, EventKind, LifecycleOp } from './core/device-events.ts';
export type { PluginApi, PluginModule } from './plugin.ts';
export type { DirtyLog, DirtyLogContext, DirtyLogType } from './dirtylog/types.ts';
export type { SiteLink, SiteLinkType, SlinkContext, SlinkDeviceContext, RemoteDevice } from './slink/types.ts';
export type { Replog, ReplogContext, ReplogType } from './replog/types.ts';
export { VERSION } from './version.ts';

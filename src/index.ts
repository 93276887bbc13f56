/**
 * dmkit as a library: `import { DeviceMapper } from 'dmkit'`.
 * An engine in-process, with the built-in targets registered; no daemon needed.
 */
import { DeviceMapper as CoreDeviceMapper } from './core/device-manager.ts';
import type { TargetType } from './core/types.ts';
import { builtinTargets } from './targets/index.ts';
import { nbdResolver } from './nbd/resolver.ts';

export class DeviceMapper extends CoreDeviceMapper {
  constructor(opts: { targets?: readonly TargetType[] } = {}) {
    super({ targets: opts.targets ?? builtinTargets });
    // nbd://, nbd+unix://, nbds:// … device references (the engine as an NBD client)
    this.addResolver(nbdResolver());
  }
}

export { builtinTargets };
export type { DeviceInfo, DeviceResolver, TableLineOut } from './core/device-manager.ts';
export { MappedDevice } from './core/mapped-device.ts';
export { BlockError, DmError, TableError, TargetArgError, DeviceError } from './core/errors.ts';
export { ArgReader } from './core/args.ts';
export { copyRanges, RegionGate } from './core/copy.ts';
export { createDirtyLog, registerDirtyLog, listDirtyLogs } from './dirtylog/registry.ts';
export { NbdClient } from './nbd/client.ts';
export { nbdResolver } from './nbd/resolver.ts';
export type { CopyProgress, CopyOptions } from './core/copy.ts';
export type { Bio, BioOp, BioFlags } from './core/bio.ts';
export type { BlockDev, Target, TargetType, TargetContext, Extent, AllocState, StatusType } from './core/types.ts';
export { VERSION } from './version.ts';

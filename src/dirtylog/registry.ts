/**
 * The dirty log registry: the only way to create a log. Targets (mirror, replicator) call
 * `createDirtyLog(type, ctx, args, targetLength)` and never import an implementation.
 * `core` and `disk` are registered here; plugins add their own with `registerDirtyLog`.
 * A type cannot be unregistered while a log of it exists.
 */
import { TargetArgError } from '../core/errors.ts';
import { Registry } from '../core/registry.ts';
import type { StatusType } from '../core/types.ts';
import { coreLog } from './core.ts';
import { diskLog } from './disk.ts';
import type { DirtyLog, DirtyLogContext, DirtyLogType } from './types.ts';

const types = new Registry<DirtyLogType>('dirty log type');
types.register(coreLog);
types.register(diskLog);

/** Add a log type; refuses a duplicate name (EEXIST) or a bad one (EINVAL). */
export function registerDirtyLog(type: DirtyLogType): void {
  types.register(type);
}

/** Remove a log type; refuses while a log of it exists (EBUSY) or if unknown (ENOENT). */
export function unregisterDirtyLog(name: string): void {
  types.unregister(name);
}

/** the registered type names, sorted */
export function listDirtyLogs(): string[] {
  return types.list().map((t) => t.name);
}

/**
 * Create a log of a registered type from its arguments (those after `<type> <#args>`),
 * for a target of `targetLength` sectors. Throws `TargetArgError`: an unknown type, or
 * the type's own message naming the bad argument.
 */
export async function createDirtyLog(
  type: string, ctx: DirtyLogContext, args: readonly string[], targetLength: number,
): Promise<DirtyLog> {
  const t = types.get(type);
  if (!t) throw new TargetArgError(`unknown dirty log type '${type}' (expected one of ${listDirtyLogs().join(', ')})`);
  const release = types.use(t.name);
  try {
    return new CountedLog(await t.create(ctx, args, targetLength), release);
  } catch (err) {
    release();
    throw err;
  }
}

/** A log whose destroy also releases its type's use count. */
class CountedLog implements DirtyLog {
  readonly #log: DirtyLog;
  readonly #release: () => void;

  constructor(log: DirtyLog, release: () => void) {
    this.#log = log;
    this.#release = release;
  }

  get type(): string {
    return this.#log.type;
  }
  get regionSize(): number {
    return this.#log.regionSize;
  }
  get regionCount(): number {
    return this.#log.regionCount;
  }
  resume(): Promise<void> {
    return this.#log.resume();
  }
  presuspend(): Promise<void> {
    return this.#log.presuspend();
  }
  postsuspend(): Promise<void> {
    return this.#log.postsuspend();
  }
  async destroy(): Promise<void> {
    try {
      await this.#log.destroy();
    } finally {
      this.#release();
    }
  }
  isClean(region: number): boolean {
    return this.#log.isClean(region);
  }
  inSync(region: number): boolean {
    return this.#log.inSync(region);
  }
  markRegion(region: number): void {
    this.#log.markRegion(region);
  }
  clearRegion(region: number): void {
    this.#log.clearRegion(region);
  }
  flush(): Promise<void> {
    return this.#log.flush();
  }
  getResyncWork(): number | null {
    return this.#log.getResyncWork();
  }
  setRegionSync(region: number, inSync: boolean): void {
    this.#log.setRegionSync(region, inSync);
  }
  getSyncCount(): number {
    return this.#log.getSyncCount();
  }
  status(type: StatusType): string {
    return this.#log.status(type);
  }
}

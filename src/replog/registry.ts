/**
 * The replication log registry: the only way to create a log. The replicator calls
 * `createReplog(type, ctx, args)` and never imports an implementation. `ringbuffer` is
 * registered here; plugins add their own with `registerReplog`. A type cannot be
 * unregistered while a log of it exists.
 */
import { TargetArgError } from '../core/errors.ts';
import { Registry } from '../core/registry.ts';
import type { StatusType } from '../core/types.ts';
import { ringbufferLog } from './ringbuffer.ts';
import type {
  AppendEntry, CheckpointState, Recovered, Replog, ReplogContext, ReplogReader, ReplogType,
} from './types.ts';

const types = new Registry<ReplogType>('replog type');
types.register(ringbufferLog);

/** Add a log type; refuses a duplicate name (EEXIST) or a bad one (EINVAL). */
export function registerReplog(type: ReplogType): void {
  types.register(type);
}

/** Remove a log type; refuses while a log of it exists (EBUSY) or if unknown (ENOENT). */
export function unregisterReplog(name: string): void {
  types.unregister(name);
}

/** the registered type names, sorted */
export function listReplogs(): string[] {
  return types.list().map((t) => t.name);
}

/**
 * Create a log of a registered type from its arguments (those after `<type> <#params>`).
 * Throws `TargetArgError`: an unknown type, or the type's own message naming the bad
 * argument or what it found on the device.
 */
export async function createReplog(type: string, ctx: ReplogContext, args: readonly string[]): Promise<Replog> {
  const t = types.get(type);
  if (!t) throw new TargetArgError(`unknown replog type '${type}' (expected one of ${listReplogs().join(', ')})`);
  const release = types.use(t.name);
  try {
    return new CountedReplog(await t.create(ctx, args), release);
  } catch (err) {
    release();
    throw err;
  }
}

/** A log whose destroy also releases its type's use count. */
class CountedReplog implements Replog {
  readonly #log: Replog;
  readonly #release: () => void;

  constructor(log: Replog, release: () => void) {
    this.#log = log;
    this.#release = release;
  }

  get type(): string {
    return this.#log.type;
  }
  get uuid(): string {
    return this.#log.uuid;
  }
  get size(): number {
    return this.#log.size;
  }
  get head(): number {
    return this.#log.head;
  }
  get tail(): number {
    return this.#log.tail;
  }
  used(): number {
    return this.#log.used();
  }
  recover(): Promise<Recovered> {
    return this.#log.recover();
  }
  append(e: AppendEntry): Promise<number> {
    return this.#log.append(e);
  }
  flush(): Promise<void> {
    return this.#log.flush();
  }
  heldHere(): boolean {
    return this.#log.heldHere?.() ?? false;
  }
  reader(fromSeq: number): ReplogReader {
    return this.#log.reader(fromSeq);
  }
  checkpoint(state: CheckpointState): Promise<void> {
    return this.#log.checkpoint(state);
  }
  reclaim(belowSeq: number): void {
    this.#log.reclaim?.(belowSeq);
  }
  resize(sectors: number): Promise<void> {
    return this.#log.resize(sectors);
  }
  status(type: StatusType): string {
    return this.#log.status(type);
  }
  async destroy(): Promise<void> {
    try {
      await this.#log.destroy();
    } finally {
      this.#release();
    }
  }
}

/**
 * The slink registry: the only way to create a site link. The replicator calls
 * `createSlink(type, ctx, slinkNr, options)` and never imports a transport. `blockdev`
 * (alias `local`) and `nbd` are registered here; `tcp` and plugins add theirs with
 * `registerSlink`.
 *
 * A type is registered under its name and each of its aliases; every one of them is a
 * table word, and `listSlinks` lists them all. Use counts are kept on the type's own
 * name, so a type cannot be unregistered while a slink of it exists, whichever name the
 * table used. A created slink's `type` is the name the table gave (`local` stays `local`).
 */
import { DmError, TargetArgError } from '../core/errors.ts';
import { Registry } from '../core/registry.ts';
import type { StatusType } from '../core/types.ts';
import { blockdevSlink } from './blockdev.ts';
import { tcpSlink } from './tcp.ts';
import { nbdSlink } from './nbd.ts';
import type { Announcement, RemoteDevice, SiteLink, SiteLinkType, SlinkContext, SlinkDeviceContext } from './types.ts';

/** Every table word: a type's name → the type itself; an alias → an entry naming its type. */
const names = new Registry<SiteLinkType>('slink type');
/** alias → the name of the type it stands for */
const aliasOf = new Map<string, string>();

registerSlink(blockdevSlink);
registerSlink(tcpSlink);
registerSlink(nbdSlink);

/**
 * Add a transport under its name and its aliases, all or none. Refuses a name or alias
 * already registered (EEXIST), or a bad one (EINVAL).
 */
export function registerSlink(type: SiteLinkType): void {
  const all = [type.name, ...(type.aliases ?? [])];
  for (const [i, n] of all.entries()) {
    if (all.indexOf(n) !== i) throw new DmError('EINVAL', `slink type '${type.name}' gives the name '${n}' twice`);
    if (names.has(n)) throw new DmError('EEXIST', `slink type '${n}' is already registered`);
  }
  const done: string[] = [];
  try {
    for (const n of all) {
      names.register(n === type.name ? type : aliasEntry(n, type));
      done.push(n);
    }
  } catch (err) {
    for (const n of done) names.unregister(n);
    throw err;
  }
  for (const n of all.slice(1)) aliasOf.set(n, type.name);
}

/**
 * Remove a transport and its aliases, by the type's name. Refuses an alias (EINVAL: name
 * the type), an unknown name (ENOENT), or a type with slinks in use (EBUSY).
 */
export function unregisterSlink(name: string): void {
  const of = aliasOf.get(name);
  if (of !== undefined) throw new DmError('EINVAL', `slink type '${name}' is an alias of '${of}': unregister '${of}'`);
  const type = names.get(name);
  names.unregister(name);
  for (const alias of type?.aliases ?? []) {
    names.unregister(alias);
    aliasOf.delete(alias);
  }
}

/** every name a table may use, aliases included, sorted (`['blockdev', 'local']`) */
export function listSlinks(): string[] {
  return names.list().map((t) => t.name);
}

/**
 * Create slink `slinkNr` of a registered type (name or alias) with its transport options
 * (`key=value` words, already split from policy and fall-behind by `parseSlinkParams`).
 * Throws `TargetArgError`: an unknown type, or the transport's own message naming the bad
 * option. The slink's `destroy` releases the type's use count.
 */
export async function createSlink(
  type: string, ctx: SlinkContext, slinkNr: number, options: readonly string[],
): Promise<SiteLink> {
  const entry = names.get(type);
  if (!entry) throw new TargetArgError(`unknown slink type '${type}' (expected one of ${listSlinks().join(', ')})`);
  const release = names.use(aliasOf.get(type) ?? type);
  try {
    return new CountedSlink(type, await entry.create(ctx, slinkNr, options), release);
  } catch (err) {
    release();
    throw err;
  }
}

/** an alias's registry entry: creates through the type it stands for */
function aliasEntry(alias: string, type: SiteLinkType): SiteLinkType {
  return { name: alias, create: (ctx, slink, options) => type.create(ctx, slink, options) };
}

/** A slink that reports the name the table gave and whose destroy releases its type's use count. */
class CountedSlink implements SiteLink {
  readonly type: string;
  readonly #link: SiteLink;
  readonly #release: () => void;

  constructor(type: string, link: SiteLink, release: () => void) {
    this.type = type;
    this.#link = link;
    this.#release = release;
  }

  get slink(): number {
    return this.#link.slink;
  }
  get retestMs(): number {
    return this.#link.retestMs;
  }
  get overNetwork(): boolean | undefined {
    return this.#link.overNetwork;
  }
  attach(ctx: SlinkDeviceContext, devNr: number, params: readonly string[]): Promise<RemoteDevice> {
    return this.#link.attach(ctx, devNr, params);
  }
  options(): string[] {
    return this.#link.options();
  }
  status(type: StatusType): string {
    return this.#link.status(type);
  }
  statusJson(): Record<string, unknown> | undefined {
    return this.#link.statusJson?.();
  }
  announce(a: Announcement): void {
    this.#link.announce?.(a);
  }
  async destroy(): Promise<void> {
    try {
      await this.#link.destroy();
    } finally {
      this.#release();
    }
  }
}

/**
 * `blockdev` slink (alias `local`): the site's devices are devices this engine can open by
 * reference — image files, block devices, `dm:NAME`, `nbd://…` — so the "site" is as far
 * away as that reference reaches. Slink 0 (the local site) is always one.
 *
 *   replicator:      blockdev <#params> <slink#> [<policy> [<fallbehind>]] [retest=<seconds>]
 *   replicator-dev:  <slink#> 1 <dev> <dlog_type> …
 *
 * I/O goes straight to the opened device: no queue, no copy, no promise of its own. A
 * failure is the device's own BlockError; `test()` flushes the device and reads sector 0.
 */
import type { Bio } from '../core/bio.ts';
import { BlockError, TargetArgError } from '../core/errors.ts';
import { escapeArg } from '../core/table-parse.ts';
import { heldHere } from '../core/file-dev.ts';
import type { BlockDev, Extent, StatusType } from '../core/types.ts';
import { optionsTable, readDeviceParam, testDevice, tooSmall } from './common.ts';
import { readOptions, readRetest } from './options.ts';
import type { RemoteDevice, SiteLink, SiteLinkType, SlinkContext, SlinkDeviceContext } from './types.ts';

const KNOWN_OPTIONS = ['retest'] as const;

/** One site device: the opened device, bios forwarded as they are. */
class BlockdevRemote implements RemoteDevice {
  readonly devNr: number;
  readonly allocation?: (sector: number, sectors: number) => Promise<Extent[]>;
  readonly #dev: BlockDev;
  #detached = false;

  constructor(dev: BlockDev, devNr: number) {
    this.#dev = dev;
    this.devNr = devNr;
    if (dev.allocation) this.allocation = (sector, sectors) => dev.allocation!(sector, sectors);
  }

  get ref(): string {
    return this.#dev.ref;
  }
  /** the site device's current size */
  get sectors(): number {
    return this.#dev.sectors;
  }

  /** as the opened device says (BlockDev.heldHere) */
  heldHere(): boolean {
    return heldHere(this.#dev);
  }

  submit(bio: Bio): Promise<void> {
    if (this.#detached) return Promise.reject(new BlockError('ESHUTDOWN', `${this.#dev.ref}: slink device detached`));
    return this.#dev.submit(bio);
  }

  /** a flush, then a read of sector 0: both must succeed */
  test(): Promise<void> {
    return testDevice((bio) => this.submit(bio));
  }

  params(): string[] {
    return [escapeArg(this.#dev.ref)];
  }

  /** nothing to close: the core releases the device with the replicator-dev's table */
  detach(): Promise<void> {
    this.#detached = true;
    return Promise.resolve();
  }
}

class BlockdevSlink implements SiteLink {
  readonly overNetwork = false;
  readonly type = 'blockdev';
  readonly slink: number;
  readonly retestMs: number;
  readonly #options: readonly string[];

  constructor(slink: number, retestMs: number, options: readonly string[]) {
    this.slink = slink;
    this.retestMs = retestMs;
    this.#options = options;
  }

  async attach(ctx: SlinkDeviceContext, devNr: number, params: readonly string[]): Promise<RemoteDevice> {
    const ref = readDeviceParam(this.slink, 'blockdev', '<dev>', params);
    const dev = await openSiteDevice(ctx, this.slink, ref);
    return new BlockdevRemote(dev, devNr);
  }

  options(): string[] {
    return [...this.#options];
  }

  /** info: nothing (the device's health shows in the replicator's state); table: the options */
  status(type: StatusType): string {
    return type === 'info' ? '' : optionsTable(this.#options);
  }

  destroy(): Promise<void> {
    return Promise.resolve();
  }
}

/** open `ref` through the replicator-dev's context; it must hold ctx.length sectors */
async function openSiteDevice(ctx: SlinkDeviceContext, slink: number, ref: string): Promise<BlockDev> {
  let dev: BlockDev;
  try {
    dev = await ctx.open(ref);
  } catch (err) {
    throw new TargetArgError(`slink ${slink}: ${(err as Error).message}`, (err as { code?: string }).code ?? 'EINVAL');
  }
  const small = tooSmall(slink, ref, dev.sectors, ctx.length);
  if (small) throw new TargetArgError(small);
  return dev;
}

/** The `blockdev` transport, also named `local`. Options: `retest=<seconds>` (default 15). */
export const blockdevSlink: SiteLinkType = {
  name: 'blockdev',
  aliases: ['local'],
  create(_ctx: SlinkContext, slink: number, options: readonly string[]): SiteLink {
    const opts = readOptions(slink, 'blockdev', options, KNOWN_OPTIONS);
    const retestMs = readRetest(slink, opts.get('retest'));
    return new BlockdevSlink(slink, retestMs, [...options]);
  },
};

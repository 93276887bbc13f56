/**
 * linear: maps the target's range onto a contiguous range of one device.
 */
import type { Bio } from '../core/bio.ts';
import { ArgReader } from '../core/args.ts';
import type { BlockDev, Extent, FileBackedDev, FileSpan, Target, TargetContext, TargetType } from '../core/types.ts';
import { openDevice, refArg } from './common.ts';

class Linear implements Target {
  readonly #dev: BlockDev;
  readonly #offset: number;
  readonly #sectors: number;

  constructor(dev: BlockDev, offset: number, sectors: number) {
    this.#dev = dev;
    this.#offset = offset;
    this.#sectors = sectors;
  }

  map(bio: Bio): Promise<void> {
    if (bio.op === 'flush') return this.#dev.submit(bio);
    return this.#dev.submit({ op: bio.op, sector: bio.sector + this.#offset, sectors: bio.sectors, data: bio.data, flags: bio.flags });
  }

  status(type: 'info' | 'table'): string {
    return type === 'table' ? `${refArg(this.#dev)} ${this.#offset}` : '';
  }

  fileMap(): FileSpan[] | null {
    const d = this.#dev as Partial<FileBackedDev>;
    if (typeof d.share !== 'function') return null;
    return [{ sectors: this.#sectors, dev: this.#dev as FileBackedDev, offset: this.#offset }];
  }

  allocation(sector: number, sectors: number): Promise<Extent[]> {
    if (!this.#dev.allocation) return Promise.resolve([{ sectors, state: 'data' }]);
    return this.#dev.allocation(sector + this.#offset, sectors);
  }
}

export const linear: TargetType = {
  name: 'linear',
  version: [1, 4, 0],
  /**
   * `<dev> <offset>`
   *   dev     file, block device, dm:NAME or NBD URI
   *   offset  first sector on dev
   */
  async create(ctx: TargetContext, args: string[]): Promise<Target> {
    const r = new ArgReader(args, 'linear');
    if (args.length !== 2) r.fail('invalid argument count (expected <dev> <offset>)');
    const ref = r.next('device');
    const offset = r.uint('device sector');
    const dev = await openDevice(ctx, ref, offset);
    return new Linear(dev, offset, ctx.length);
  },
};

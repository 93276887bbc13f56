/**
 * striped: spreads the target's range over N devices in chunks (RAID 0), as dm-stripe.
 *
 *   chunk  = sector div chunk_size            (sector relative to the target start)
 *   stripe = chunk mod N
 *   sector on that stripe = (chunk div N) · chunk_size + sector mod chunk_size + offset
 *
 * The core splits bios at chunk boundaries (`maxIoSectors` = chunk size), so every bio but
 * a flush lands on exactly one stripe; a flush goes to every stripe. A failed bio marks its
 * stripe `D` in the status (never back to `A` for the life of the table) and raises one
 * event on that transition.
 */
import type { Bio } from '../core/bio.ts';
import { ArgReader } from '../core/args.ts';
import { TargetArgError, toBlockError } from '../core/errors.ts';
import { settleAll } from '../core/mapped-device.ts';
import { appendClipped } from '../core/extents.ts';
import type { BlockDev, Extent, StatusType, Target, TargetContext, TargetType } from '../core/types.ts';
import { openDevice, refArg } from './common.ts';

/** chunk sizes are multiples of this many sectors (4 KiB, the kernel's PAGE_SIZE floor) */
export const CHUNK_ALIGN = 8;
const UINT32_MAX = 0xffffffff;
/** allocation() looks at most this many chunks per call and answers for those alone (a short answer) */
const ALLOCATION_CHUNKS = 256;

/** Where a target-relative sector lands: the stripe index and the sector on it (before its offset). */
export interface StripePlace {
  stripe: number;
  sector: number;
}

/** The striped mapping of one target-relative sector. */
export function stripeSector(sector: number, stripes: number, chunkSize: number): StripePlace {
  const chunk = Math.floor(sector / chunkSize);
  const inChunk = sector - chunk * chunkSize;
  const stripe = chunk % stripes;
  return { stripe, sector: ((chunk - stripe) / stripes) * chunkSize + inChunk };
}

interface Stripe {
  readonly dev: BlockDev;
  readonly offset: number;
  alive: boolean;
}

class Striped implements Target {
  readonly maxIoSectors: number;
  readonly #stripes: Stripe[];
  readonly #chunk: number;
  readonly #ctx: TargetContext;

  constructor(ctx: TargetContext, chunk: number, stripes: Stripe[]) {
    this.#ctx = ctx;
    this.#chunk = chunk;
    this.#stripes = stripes;
    this.maxIoSectors = chunk;
  }

  map(bio: Bio): Promise<void> {
    const stripes = this.#stripes;
    if (bio.op === 'flush') {
      return settleAll(stripes.map((s) => this.#issue(s, bio)));
    }
    const place = stripeSector(bio.sector, stripes.length, this.#chunk);
    const s = stripes[place.stripe]!;
    return this.#issue(s, { op: bio.op, sector: place.sector + s.offset, sectors: bio.sectors, data: bio.data, flags: bio.flags });
  }

  #issue(s: Stripe, bio: Bio): Promise<void> {
    return s.dev.submit(bio).catch((err: unknown) => {
      const e = toBlockError(err);
      if (e.code !== 'ENOTSUP' && s.alive) {
        s.alive = false;
        this.#ctx.log.warn(`stripe ${s.dev.ref} failed (${e.code}): ${e.message}`);
        this.#ctx.event(`stripe ${s.dev.ref} failed (${e.code})`);
      }
      throw e;
    });
  }

  status(type: StatusType): string {
    const s = this.#stripes;
    if (type === 'info') {
      const health = s.map((x) => (x.alive ? 'A' : 'D')).join('');
      return `${s.length} ${s.map((x) => refArg(x.dev)).join(' ')} 1 ${health}`;
    }
    return `${s.length} ${this.#chunk} ${s.map((x) => `${refArg(x.dev)} ${x.offset}`).join(' ')}`;
  }

  /** Chunk by chunk from each stripe's own map; at most ALLOCATION_CHUNKS chunks per call. */
  async allocation(sector: number, sectors: number): Promise<Extent[]> {
    const out: Extent[] = [];
    const end = sector + sectors;
    let s = sector;
    for (let n = 0; s < end && n < ALLOCATION_CHUNKS; n++) {
      const len = Math.min(end, (Math.floor(s / this.#chunk) + 1) * this.#chunk) - s;
      const place = stripeSector(s, this.#stripes.length, this.#chunk);
      const st = this.#stripes[place.stripe]!;
      const part = st.dev.allocation ? await st.dev.allocation(place.sector + st.offset, len) : [];
      const covered = appendClipped(out, part, len);
      if (covered === 0) out.push({ sectors: len, state: 'data' });
      else if (covered < len) break; // a stripe answered short: so do we
      s += len;
    }
    return out;
  }
}

/** `<#stripes> <chunk_sectors>`: the count, the chunk size, and the checks on the target length */
function parseGeometry(r: ArgReader, length: number): { stripes: number; chunk: number; width: number } {
  const stripes = r.uint('stripe count', { min: 1, max: UINT32_MAX });
  const chunk = r.uint('chunk size', { max: UINT32_MAX });
  if (chunk < CHUNK_ALIGN || chunk % CHUNK_ALIGN !== 0) {
    r.fail(`invalid chunk size '${chunk}' (must be a multiple of ${CHUNK_ALIGN} sectors, at least ${CHUNK_ALIGN})`);
  }
  if (length % stripes !== 0) {
    r.fail(`target length not divisible by number of stripes: ${length} sectors over ${stripes} stripes`);
  }
  const width = length / stripes;
  if (width % chunk !== 0) {
    r.fail(`target length not divisible by chunk size: ${length} sectors over ${stripes} stripes is ${width} per stripe, not a multiple of ${chunk}`);
  }
  return { stripes, chunk, width };
}

/** `(<dev> <offset>){#stripes}`, nothing after */
function parseDestinations(r: ArgReader, stripes: number): Array<{ ref: string; offset: number }> {
  if (r.remaining < 2 * stripes) {
    r.fail(`not enough destinations: ${stripes} stripes need ${stripes} <dev> <offset> pairs, got ${r.remaining} argument(s)`);
  }
  const out: Array<{ ref: string; offset: number }> = [];
  for (let i = 0; i < stripes; i++) {
    const ref = r.next(`stripe ${i} device`);
    out.push({ ref, offset: r.uint(`stripe ${i} offset`) });
  }
  r.expectEnd();
  return out;
}

/** open each stripe; each must hold offset + length / #stripes sectors */
async function openStripes(ctx: TargetContext, dests: Array<{ ref: string; offset: number }>, width: number): Promise<Stripe[]> {
  const out: Stripe[] = [];
  for (const [i, d] of dests.entries()) {
    try {
      out.push({ dev: await openDevice(ctx, d.ref, d.offset, width), offset: d.offset, alive: true });
    } catch (err) {
      throw new TargetArgError(`stripe ${i}: ${(err as Error).message}`, (err as TargetArgError).code);
    }
  }
  return out;
}

export const striped: TargetType = {
  name: 'striped',
  version: [1, 6, 0],
  /**
   * `<#stripes> <chunk_sectors> (<dev> <offset>){#stripes}`
   *   #stripes       1 or more
   *   chunk_sectors  a multiple of 8 sectors (4 KiB), not necessarily a power of 2
   *   dev offset     each stripe's device and first sector; it must hold length / #stripes sectors
   * The target length must divide by #stripes, and length / #stripes by chunk_sectors.
   */
  async create(ctx: TargetContext, args: string[]): Promise<Target> {
    const r = new ArgReader(args, 'striped');
    if (args.length < 2) r.fail('not enough arguments (expected <#stripes> <chunk_sectors> (<dev> <offset>)…)');
    const { stripes, chunk, width } = parseGeometry(r, ctx.length);
    const dests = parseDestinations(r, stripes);
    return new Striped(ctx, chunk, await openStripes(ctx, dests, width));
  },
};

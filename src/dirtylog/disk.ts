/**
 * `disk` dirty log: the clean bits persist on a log device in the kernel's format
 * (disk-format.ts), so after a crash only regions that were dirty need a resync.
 *
 *   disk <2|3> <log_dev> <region_size> [sync|nosync]
 *
 * The whole log area (header + clean bits) is one buffer, written as one I/O from a
 * snapshot; marks are flushed to the device before the dependent data write, clears only
 * after `flushData` made the data they describe durable (dm-log.c's disk_flush).
 */
import { ArgReader } from '../core/args.ts';
import { EMPTY } from '../core/bio.ts';
import { TargetArgError, toBlockError } from '../core/errors.ts';
import { escapeArg } from '../core/table-parse.ts';
import type { BlockDev, StatusType } from '../core/types.ts';
import {
  BITS_OFFSET, MIRROR_DISK_VERSION, MIRROR_MAGIC, checkHeader, cleanBitsView, decodeHeader, encodeHeader, logAreaBytes,
} from './disk-format.ts';
import { RegionStateLog } from './region-log.ts';
import { RegionState, checkArgCount, readRegionSize, readSyncMode, syncSuffix } from './region-state.ts';
import type { DirtyLog, DirtyLogContext, DirtyLogType, SyncMode } from './types.ts';

const RESOLVED = Promise.resolve();
const noop = (): void => {};

type Health = 'A' | 'D' | 'F';

class DiskLog extends RegionStateLog implements DirtyLog {
  readonly #ctx: DirtyLogContext;
  readonly #dev: BlockDev;
  readonly #mode: SyncMode;
  /** what the log device should hold: header + clean bits (the state's clean bitset lives here) */
  readonly #area: Buffer;
  /** the snapshot being written or the block being read */
  readonly #io: Buffer;
  /** `sync`/`nosync` start a new log at the first resume only */
  #startNew: boolean;
  #health: Health = 'A';
  #running: Promise<void> | null = null;
  #queued: Promise<void> | null = null;

  constructor(ctx: DirtyLogContext, dev: BlockDev, regionSize: number, regionCount: number, mode: SyncMode) {
    const area = Buffer.alloc(logAreaBytes(regionCount));
    super('disk', regionSize, regionCount, new RegionState(regionCount, mode, cleanBitsView(area, regionCount)));
    this.#ctx = ctx;
    this.#dev = dev;
    this.#mode = mode;
    this.#startNew = mode !== 'default';
    this.#area = area;
    this.#io = Buffer.alloc(this.#area.length);
  }

  async resume(): Promise<void> {
    await this.#idle();
    const st = this.state;
    const known = await this.#readRegions();
    st.clean.fillRange(known, this.regionCount, this.#mode === 'nosync');
    st.clean.clearPadding();
    st.loadSyncFromClean();
    st.flushFailed = false;
    st.touchedCleaned = false;
    st.touchedDirtied = true;
    this.#startNew = false;
    this.#area.fill(0, 0, BITS_OFFSET);
    encodeHeader({ magic: MIRROR_MAGIC, version: MIRROR_DISK_VERSION, nrRegions: this.regionCount }, this.#area);
    await this.flush().catch(noop); // a failure is in the log's health (status) and raised an event
  }

  /** Read the log; copy its clean bits in. Returns how many regions it describes (0 = new log). */
  async #readRegions(): Promise<number> {
    try {
      await this.#dev.submit({ op: 'read', sector: 0, sectors: this.#io.length / 512, data: this.#io, flags: {} });
    } catch (err) {
      this.#fail('D', `cannot read the log: ${(err as Error).message}`);
      return 0;
    }
    const header = decodeHeader(this.#io);
    const check = checkHeader(header);
    if (check === 'bad-version') {
      this.#fail('D', `incompatible disk log version ${header.version}`);
      return 0;
    }
    if (this.#startNew || check === 'bad-magic') return 0;
    this.#io.copy(this.#area, BITS_OFFSET, BITS_OFFSET);
    return Math.min(header.nrRegions, this.regionCount);
  }

  presuspend(): Promise<void> {
    return RESOLVED;
  }
  postsuspend(): Promise<void> {
    return this.#idle();
  }
  destroy(): Promise<void> {
    return RESOLVED;
  }

  flush(): Promise<void> {
    if (this.#queued) return this.#queued;
    const st = this.state;
    const touched = st.touchedDirtied || st.touchedCleaned;
    if (this.#running) {
      if (!touched) return this.#running;
      const q = this.#running.then(noop, noop).then(() => {
        this.#queued = null;
        return this.#start();
      });
      this.#queued = q;
      return q;
    }
    return touched ? this.#start() : RESOLVED;
  }

  #start(): Promise<void> {
    const st = this.state;
    const dirtied = st.touchedDirtied;
    const cleaned = st.touchedCleaned;
    st.touchedDirtied = false;
    st.touchedCleaned = false;
    const p: Promise<void> = this.#write(dirtied, cleaned).finally(() => {
      if (this.#running === p) this.#running = null;
    });
    this.#running = p;
    return p;
  }

  /** Write a snapshot of the area; flush the device when it records new marks. */
  async #write(dirtied: boolean, cleaned: boolean): Promise<void> {
    const st = this.state;
    this.#area.copy(this.#io);
    if (cleaned && this.#ctx.flushData) {
      try {
        await this.#ctx.flushData();
      } catch (err) {
        // the cleared regions' data may not be stable: from now on every region is dirty
        this.#ctx.log.warn(`${this.#ctx.device}: data flush failed, treating every region as dirty: ${(err as Error).message}`);
        st.flushFailed = true;
        st.clean.fill(false);
        this.#area.copy(this.#io);
        dirtied = true;
      }
    }
    const sectors = this.#io.length / 512;
    try {
      await this.#dev.submit({ op: 'write', sector: 0, sectors, data: this.#io, flags: {} });
    } catch (err) {
      st.touchedDirtied ||= dirtied;
      st.touchedCleaned ||= cleaned;
      this.#fail('D', `cannot write the log: ${(err as Error).message}`);
      throw toBlockError(err);
    }
    if (!dirtied) return;
    try {
      await this.#dev.submit({ op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} });
    } catch (err) {
      st.touchedDirtied = true;
      this.#fail('F', `cannot flush the log: ${(err as Error).message}`);
      throw toBlockError(err);
    }
  }

  /** until no write is running or queued */
  async #idle(): Promise<void> {
    for (let p = this.#queued ?? this.#running; p; p = this.#queued ?? this.#running) await p.catch(noop);
  }

  #fail(kind: 'D' | 'F', why: string): void {
    const before = this.#health;
    if (kind === 'F' || before === 'A') this.#health = kind;
    if (before !== 'A') return;
    this.#ctx.log.warn(`${this.#ctx.device}: disk log ${this.#dev.ref} failed: ${why}`);
    this.#ctx.event();
  }

  status(type: StatusType): string {
    if (type === 'info') return `3 disk ${this.#dev.ref} ${this.#health}`;
    const count = this.#mode === 'default' ? 2 : 3;
    return `disk ${count} ${escapeArg(this.#dev.ref)} ${this.regionSize}${syncSuffix(this.#mode)}`;
  }
}

export const diskLog: DirtyLogType = {
  name: 'disk',
  /** `<log_dev> <region_size> [sync|nosync]` */
  async create(ctx, args, targetLength) {
    const r = new ArgReader(args, 'disk');
    checkArgCount(r, 'disk', args.length, 2, '<log_dev> <region_size> [sync|nosync]');
    const ref = r.next('log device');
    const regionSize = readRegionSize(r, targetLength);
    const mode = readSyncMode(r);
    r.expectEnd();
    const regionCount = Math.ceil(targetLength / regionSize);
    const dev = await openLogDevice(ctx, ref);
    const need = logAreaBytes(regionCount);
    if (dev.sectors * 512 < need) {
      r.fail(`log device too small: ${ref} has ${dev.sectors} sectors, needs ${need / 512} for ${regionCount} regions`);
    }
    return new DiskLog(ctx, dev, regionSize, regionCount, mode);
  },
};

async function openLogDevice(ctx: DirtyLogContext, ref: string): Promise<BlockDev> {
  try {
    return await ctx.open(ref);
  } catch (err) {
    throw new TargetArgError((err as Error).message, (err as { code?: string }).code ?? 'EINVAL');
  }
}

/**
 * The `ringbuffer` log's device access: every read and write of the log goes through here
 * as a bio on the BlockDev the log opened (ctx.open), at sectors relative to `dev_start`.
 * Failures reject with a `BlockError` (errno code, unknown → EIO).
 */
import { EMPTY } from '../core/bio.ts';
import { toBlockError } from '../core/errors.ts';
import type { BlockDev } from '../core/types.ts';
import {
  CHECKPOINT_SECTOR, DATA_SECTOR, HEADER_BYTES, SLOT_BYTES, SLOT_COUNT, SLOT_SECTORS, encodeCheckpoint, encodeHeader,
  initialCheckpoint,
} from './ring-format.ts';
import type { Checkpoint, LogHeader } from './ring-format.ts';

export class LogDevice {
  readonly dev: BlockDev;
  /** the log's first sector on the device */
  readonly devStart: number;
  /** the ring area's first sector on the device */
  readonly #ringSector: number;

  constructor(dev: BlockDev, devStart: number) {
    this.dev = dev;
    this.devStart = devStart;
    this.#ringSector = devStart + DATA_SECTOR;
  }

  /** the device reference as the table gave it */
  get ref(): string {
    return this.dev.ref;
  }

  /** the 4 KiB header block */
  async readHeader(): Promise<Buffer> {
    const b = Buffer.alloc(HEADER_BYTES);
    await this.#io('read', this.devStart, b, false);
    return b;
  }

  /** Write the header block, durable before it resolves. */
  writeHeader(h: LogHeader): Promise<void> {
    return this.#io('write', this.devStart, encodeHeader(h), true);
  }

  /** both checkpoint slots, slot 0 first */
  async readSlots(): Promise<Buffer[]> {
    const b = Buffer.alloc(SLOT_COUNT * SLOT_BYTES);
    await this.#io('read', this.devStart + CHECKPOINT_SECTOR, b, false);
    return Array.from({ length: SLOT_COUNT }, (_, i) => b.subarray(i * SLOT_BYTES, (i + 1) * SLOT_BYTES));
  }

  /** Write checkpoint `cp` to slot `generation mod 2`, durable before it resolves. */
  writeCheckpoint(cp: Checkpoint, uuid: Buffer): Promise<void> {
    const slot = cp.generation % SLOT_COUNT;
    return this.#io('write', this.devStart + CHECKPOINT_SECTOR + slot * SLOT_SECTORS, encodeCheckpoint(cp, uuid), true);
  }

  /**
   * Make a new, empty log: first the old header is zeroed (durably), so that a crash
   * part-way leaves "no log here" rather than an old header over new slots; then slot 0
   * zeroed and the initial checkpoint (generation 1: tail seq 1 at offset 0) in slot 1;
   * then the header, and a device flush. Returns the initial checkpoint.
   */
  async createLog(h: LogHeader): Promise<Checkpoint> {
    const initial = initialCheckpoint(h.created);
    await this.#io('write', this.devStart, Buffer.alloc(HEADER_BYTES), true);
    await this.#io('write', this.devStart + CHECKPOINT_SECTOR, Buffer.alloc(SLOT_BYTES), false);
    await this.writeCheckpoint(initial, h.uuid);
    await this.writeHeader(h);
    await this.flush();
    return initial;
  }

  /** Read `buf.length` bytes (a multiple of 512) at ring offset `off`. */
  readRing(off: number, buf: Buffer): Promise<void> {
    return this.#io('read', this.#ringSector + off / 512, buf, false);
  }

  /** Write `buf` (a multiple of 512 bytes) at ring offset `off`. */
  writeRing(off: number, buf: Buffer): Promise<void> {
    return this.#io('write', this.#ringSector + off / 512, buf, false);
  }

  /** Make every completed write durable (a flush bio: fdatasync on files). */
  flush(): Promise<void> {
    return this.dev.submit({ op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} }).catch(rethrow);
  }

  #io(op: 'read' | 'write', sector: number, data: Buffer, fua: boolean): Promise<void> {
    return this.dev.submit({ op, sector, sectors: data.length / 512, data, flags: fua ? { fua: true } : {} }).catch(rethrow);
  }
}

function rethrow(err: unknown): never {
  throw toBlockError(err);
}

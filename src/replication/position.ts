/**
 * The receiver's applied position of one stream (a sender's log and slink), persisted so
 * that either side can crash and the stream resumes without applying an entry twice or out
 * of order. One small file per stream under `<state>/replication/`, two 512-byte slots
 * written in turn; a record is whole or ignored (CRC32C), and the newest whole one wins:
 *
 *    0 u32 magic 'DMKP'   4 u32 version 1   8 u64 generation (higher wins)
 *   16 u64 applied: every log entry with seq ≤ applied is on the devices
 *   24 u64 epoch: the epoch being applied when it was written
 *   32 u64 durable applied   40 u64 durable epoch: the same, as of the last flush of the devices
 *   48 16 B the sender's log uuid   64 16 B the machine's boot id when written
 *   80 u32 slink   84 u32 CRC32C of bytes 0 … 83
 *
 * `record` is a pwrite: it survives the process being killed (the page cache keeps it) but
 * not power loss, and the kernel may write it back before the data it speaks of. So a
 * record also carries the *durable* position, the one `sync` set after the receiver
 * flushed every device of the stream; after a reboot (another boot id) the durable one is
 * taken, since data and position written since then may have been lost in any order.
 */
import fs from 'node:fs';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { BOOT_ID, HAS_BOOT_ID } from '../core/boot-id.ts';
import { DmError } from '../core/errors.ts';
import { datasync } from '../core/file-dev.ts';
import { readU64BE, writeU64BE } from '../core/u64.ts';

const MAGIC = 0x444d4b50; // 'DMKP'
const VERSION = 1;
const SLOT = 512;
const CRC_AT = 84;

export interface Applied {
  readonly applied: number;
  readonly epoch: number;
}

export class PositionFile implements Applied {
  readonly path: string;
  #fd: number;
  #gen: number;
  #applied: number;
  #epoch: number;
  #durable: { applied: number; epoch: number };
  readonly #uuid: Buffer;
  readonly #slink: number;
  readonly #buf = Buffer.alloc(SLOT);
  #rewinds = 0;

  private constructor(file: string, fd: number, uuid: Buffer, slink: number, found: Slot) {
    this.path = file;
    this.#fd = fd;
    this.#uuid = uuid;
    this.#slink = slink;
    this.#gen = found.gen;
    // written in this boot: the page cache had it, so it holds; else only what was flushed
    const sameBoot = HAS_BOOT_ID && found.boot.equals(BOOT_ID);
    this.#applied = sameBoot ? found.applied : found.durableApplied;
    this.#epoch = sameBoot ? found.epoch : found.durableEpoch;
    this.#durable = { applied: found.durableApplied, epoch: found.durableEpoch };
  }

  /** the stream's file in `dir` (created empty when new: applied 0) */
  static open(dir: string, groupId: string, slink: number): PositionFile {
    if (!/^[0-9a-f]{32}$/.test(groupId)) throw new DmError('EINVAL', `stream id '${groupId}' is not a 16-byte hex log uuid`);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const file = path.join(dir, `${groupId}.${slink}.pos`);
    const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    const uuid = Buffer.from(groupId, 'hex');
    const b = Buffer.alloc(SLOT * 2);
    fs.readSync(fd, b, 0, b.length, 0);
    let best: Slot = { gen: 0, applied: 0, epoch: 0, durableApplied: 0, durableEpoch: 0, boot: BOOT_ID };
    for (let i = 0; i < 2; i++) {
      const r = decode(b.subarray(i * SLOT, (i + 1) * SLOT), uuid, slink);
      if (r && r.gen > best.gen) best = r;
    }
    return new PositionFile(file, fd, uuid, slink, best);
  }

  get applied(): number {
    return this.#applied;
  }
  get epoch(): number {
    return this.#epoch;
  }

  /** REWINDs taken (a `sync` begun before one does not raise the durable position) */
  get rewinds(): number {
    return this.#rewinds;
  }

  /** the position as of the last `sync` */
  get durable(): { readonly applied: number; readonly epoch: number } {
    return this.#durable;
  }

  /** record a new position (in the slot not holding the newest record) */
  record(applied: number, epoch: number): void {
    if (applied === this.#applied && epoch === this.#epoch) return;
    this.#write(applied, epoch);
  }

  #write(applied: number, epoch: number): void {
    const gen = this.#gen + 1;
    const b = this.#buf;
    b.fill(0);
    b.writeUInt32BE(MAGIC, 0);
    b.writeUInt32BE(VERSION, 4);
    writeU64BE(b, gen, 8);
    writeU64BE(b, applied, 16);
    writeU64BE(b, epoch, 24);
    writeU64BE(b, this.#durable.applied, 32);
    writeU64BE(b, this.#durable.epoch, 40);
    this.#uuid.copy(b, 48);
    BOOT_ID.copy(b, 64);
    b.writeUInt32BE(this.#slink, 80);
    b.writeUInt32BE(crc32c(b.subarray(0, CRC_AT)) >>> 0, CRC_AT);
    fs.writeSync(this.#fd, b, 0, SLOT, (gen % 2) * SLOT);
    this.#gen = gen;
    this.#applied = applied;
    this.#epoch = epoch;
  }

  /**
   * The devices were flushed: position `at` (the one recorded when the flush began, by
   * default the one recorded now) is durable. Written with the durable fields set to it,
   * then fdatasync'd.
   */
  sync(at: Applied = { applied: this.#applied, epoch: this.#epoch }, rewinds = this.#rewinds): Promise<void> {
    // a position taken before a rewind is not made durable: the entries now below it may be
    // newer than that flush (only the fdatasync is done)
    if (rewinds !== this.#rewinds) at = this.#durable;
    if (this.#durable.applied !== at.applied || this.#durable.epoch !== at.epoch) {
      this.#durable = { applied: at.applied, epoch: at.epoch };
      this.#write(this.#applied, this.#epoch);
    }
    return datasync(this.#fd);
  }

  /**
   * Set the position back to (`applied`, `epoch`) (REWIND: the sender's log lacks what this
   * site applied past `applied`), durable at once: written, the durable fields lowered to it
   * unless already lower, then fdatasync'd. A reboot must not bring the old position back,
   * or entries the sender numbers anew would be skipped as applied.
   */
  rewind(applied: number, epoch: number): Promise<void> {
    this.#rewinds++;
    if (this.#durable.applied >= applied) this.#durable = { applied, epoch };
    this.#write(applied, epoch);
    return datasync(this.#fd);
  }

  close(): void {
    if (this.#fd < 0) return;
    fs.closeSync(this.#fd);
    this.#fd = -1;
  }
}

interface Slot {
  gen: number;
  applied: number;
  epoch: number;
  durableApplied: number;
  durableEpoch: number;
  boot: Buffer;
}

function decode(b: Buffer, uuid: Buffer, slink: number): Slot | null {
  if (b.readUInt32BE(0) !== MAGIC || b.readUInt32BE(4) !== VERSION) return null;
  if ((crc32c(b.subarray(0, CRC_AT)) >>> 0) !== b.readUInt32BE(CRC_AT)) return null;
  if (!b.subarray(48, 64).equals(uuid) || b.readUInt32BE(80) !== slink) return null;
  const u = (o: number): number => readU64BE(b, o);
  return { gen: u(8), applied: u(16), epoch: u(24), durableApplied: u(32), durableEpoch: u(40), boot: Buffer.from(b.subarray(64, 80)) };
}

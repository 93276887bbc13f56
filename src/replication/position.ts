/**
 * The receiver's applied position of one stream (a sender's log and slink), persisted so
 * that either side can crash and the stream resumes without applying an entry twice or out
 * of order. One small file per stream under `<state>/replication/`, two 512-byte slots
 * written in turn; a record is whole or ignored (CRC32C), and the newest whole one wins:
 *
 *    0 u32 magic 'DMKP'   4 u32 version 1   8 u64 generation (higher wins)
 *   16 u64 applied: every log entry with seq ≤ applied is on the devices
 *   24 u64 epoch: the epoch being applied when it was written
 *   32 16 B the sender's log uuid   48 u32 slink   52 u32 CRC32C of bytes 0 … 51
 *
 * `record` is a pwrite (it survives the process being killed: the page cache keeps it);
 * `sync` makes it survive power loss too, and the receiver calls it after flushing the
 * devices when the sender asks for a flush.
 */
import fs from 'node:fs';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { DmError } from '../core/errors.ts';

const MAGIC = 0x444d4b50; // 'DMKP'
const VERSION = 1;
const SLOT = 512;
const CRC_AT = 52;

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
  readonly #uuid: Buffer;
  readonly #slink: number;
  readonly #buf = Buffer.alloc(SLOT);

  private constructor(file: string, fd: number, uuid: Buffer, slink: number, found: { gen: number; applied: number; epoch: number }) {
    this.path = file;
    this.#fd = fd;
    this.#uuid = uuid;
    this.#slink = slink;
    this.#gen = found.gen;
    this.#applied = found.applied;
    this.#epoch = found.epoch;
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
    let best = { gen: 0, applied: 0, epoch: 0 };
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

  /** record a new position (in the slot not holding the newest record) */
  record(applied: number, epoch: number): void {
    if (applied === this.#applied && epoch === this.#epoch) return;
    const gen = this.#gen + 1;
    const b = this.#buf;
    b.fill(0);
    b.writeUInt32BE(MAGIC, 0);
    b.writeUInt32BE(VERSION, 4);
    b.writeBigUInt64BE(BigInt(gen), 8);
    b.writeBigUInt64BE(BigInt(applied), 16);
    b.writeBigUInt64BE(BigInt(epoch), 24);
    this.#uuid.copy(b, 32);
    b.writeUInt32BE(this.#slink, 48);
    b.writeUInt32BE(crc32c(b.subarray(0, CRC_AT)) >>> 0, CRC_AT);
    fs.writeSync(this.#fd, b, 0, SLOT, (gen % 2) * SLOT);
    this.#gen = gen;
    this.#applied = applied;
    this.#epoch = epoch;
  }

  /** make the recorded position durable */
  sync(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.#fd, (err) => (err ? reject(err) : resolve())));
  }

  close(): void {
    if (this.#fd < 0) return;
    fs.closeSync(this.#fd);
    this.#fd = -1;
  }
}

function decode(b: Buffer, uuid: Buffer, slink: number): { gen: number; applied: number; epoch: number } | null {
  if (b.readUInt32BE(0) !== MAGIC || b.readUInt32BE(4) !== VERSION) return null;
  if ((crc32c(b.subarray(0, CRC_AT)) >>> 0) !== b.readUInt32BE(CRC_AT)) return null;
  if (!b.subarray(32, 48).equals(uuid) || b.readUInt32BE(48) !== slink) return null;
  return { gen: Number(b.readBigUInt64BE(8)), applied: Number(b.readBigUInt64BE(16)), epoch: Number(b.readBigUInt64BE(24)) };
}

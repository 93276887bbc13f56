/**
 * The on-disk format of the `ringbuffer` replication log, version 1 (docs/formats/replog.md).
 * Encoding, decoding and CRC32C only: pure functions over buffers, no I/O and no policy.
 * Sectors are relative to the log's `dev_start`; ring offsets are bytes from the start of
 * the ring area. All integers are little-endian.
 *
 *   sector 0–7    log header (4 KiB; CRC32C over bytes 0–4091 at byte 4092)
 *   sector 8–15   checkpoint slot 0 (4 KiB, same CRC placement)
 *   sector 16–23  checkpoint slot 1
 *   sector 24…    ring area: entries, each a 512-byte header + payload padded to 512
 *
 * Entry header (512 bytes; bytes 76–511 are zero):
 *
 *   0  u32 magic "DMKE"      4  u32 CRC32C over bytes 8–511 and then the payload
 *   8  u8 kind (1 entry, 2 wrap)  9 u8 op  10 u8 flags (bit 0 fua)  11 u8 devNr
 *   12 u32 payload bytes     16 16 B log uuid    32 u64 seq     40 u64 epoch
 *   48 u64 sector            56 u64 sectors      64 u64 time ms 72 u32 CRC of entry seq − 1
 */
import { crc32c } from '@node-rs/crc32';
import { CHECKPOINT_MAX_ACTIVE, CHECKPOINT_MAX_LEFT, type CheckpointState, type ReplogOp, type SlinkPosition } from './types.ts';

export const FORMAT_VERSION = 1;
export const LOG_MAGIC = Buffer.from('DMKRLOG\0', 'latin1');
export const CHECKPOINT_MAGIC = Buffer.from('DMKRCKP\0', 'latin1');
/** "DMKE" as a little-endian u32 */
export const ENTRY_MAGIC = 0x454b4d44;

export const HEADER_BYTES = 4096;
export const SLOT_BYTES = 4096;
export const SLOT_COUNT = 2;
/** where the checkpoint slots and the ring area start, in sectors from dev_start */
export const CHECKPOINT_SECTOR = 8;
export const SLOT_SECTORS = SLOT_BYTES / 512;
export const DATA_SECTOR = CHECKPOINT_SECTOR + SLOT_COUNT * SLOT_SECTORS;
/** the smallest log: 2 MiB, header and slots included */
export const MIN_LOG_SECTORS = 4096;
export const MAX_SLINKS = 64;
export const ENTRY_HEADER_BYTES = 512;
/** the CRC sits at the end of the header and checkpoint blocks, covering everything before it */
const BLOCK_CRC_AT = 4092;
const ENTRY_CRC_AT = 4;
/** the entry CRC covers the header from here on (past magic and CRC), then the payload */
const ENTRY_CRC_FROM = 8;
const KIND_ENTRY = 1;
const KIND_WRAP = 2;
const FLAG_FUA = 1;
const CHECKPOINT_INITIAL = 1;
const SLINKS_AT = 80;
const SLINK_BYTES = 16;
/** the replicator's epoch counter (u64) and the slinks to verify whole (a u64 bitmap, bit n = slink n) */
const EPOCH_AT = 3072;
const VERIFY_AT = 3080;
/** the machine's boot id when written (16 bytes), and 1 when the group was quiesced */
const BOOT_AT = 3088;
const QUIESCED_AT = 3104;
/** the group's device numbers (a 256-bit bitmap, bit n = device n) */
const DEVICES_AT = 3112;
/** devices forgotten (a bitmap like DEVICES_AT); devices that left: a u32 count, then records of u32 device number and u64 seq */
const FORGOTTEN_AT = 3144;
const LEFT_COUNT_AT = 3176;
const LEFT_AT = 3184;
const LEFT_BYTES = 12;
/** the records of devices that left that a checkpoint holds (they fit before the CRC) */
const MAX_LEFT = CHECKPOINT_MAX_LEFT;
if (LEFT_AT + MAX_LEFT * LEFT_BYTES > BLOCK_CRC_AT) throw new Error('checkpoint slot layout: the devices that left overlap the CRC');
/** the activity log: u32 count, u8 flags (bit 0 kept, bit 1 incomplete), 3 zero bytes, then u32 keys */
const ACTIVE_COUNT_AT = 1104;
const ACTIVE_FLAGS_AT = 1108;
const ACTIVE_AT = 1112;
const ACTIVE_KEPT = 1;
const ACTIVE_INCOMPLETE = 2;
if (SLINKS_AT + MAX_SLINKS * SLINK_BYTES > ACTIVE_COUNT_AT || ACTIVE_AT + CHECKPOINT_MAX_ACTIVE * 4 > EPOCH_AT) throw new Error('checkpoint slot layout: the activity log overlaps');
const TWO32 = 4294967296;

const OP_CODES: Readonly<Record<ReplogOp, number>> = { write: 1, discard: 2, 'write-zeroes': 3, flush: 4 };
const OPS: readonly (ReplogOp | undefined)[] = [undefined, 'write', 'discard', 'write-zeroes', 'flush'];

/** Write a non-negative safe integer as u64 LE. */
export function putU64(b: Buffer, at: number, n: number): void {
  b.writeUInt32LE(n >>> 0, at);
  b.writeUInt32LE(Math.floor(n / TWO32), at + 4);
}

/** Read a u64 LE; -1 when it is beyond Number.MAX_SAFE_INTEGER. */
export function getU64(b: Buffer, at: number): number {
  const hi = b.readUInt32LE(at + 4);
  return hi > 0x1fffff ? -1 : hi * TWO32 + b.readUInt32LE(at);
}

/** bytes an entry with `payloadBytes` takes in the ring: header + payload padded to 512 */
export function entryBytes(payloadBytes: number): number {
  return ENTRY_HEADER_BYTES + Math.ceil(payloadBytes / 512) * 512;
}

// ---------------------------------------------------------------------------------------
// Log header

export interface LogHeader {
  readonly version: number;
  /** 16 random bytes naming this log; every entry and checkpoint carries them */
  readonly uuid: Buffer;
  /** sectors the whole log takes from dev_start (header, slots and ring) */
  readonly size: number;
  /** first sector of the ring area, from dev_start */
  readonly dataSector: number;
  readonly checkpointSector: number;
  readonly slotSectors: number;
  readonly slots: number;
  /** creation time, ms since the epoch */
  readonly created: number;
}

/** A version-1 header for a new log. */
export function newHeader(uuid: Buffer, size: number, created: number): LogHeader {
  return {
    version: FORMAT_VERSION, uuid, size, dataSector: DATA_SECTOR, checkpointSector: CHECKPOINT_SECTOR,
    slotSectors: SLOT_SECTORS, slots: SLOT_COUNT, created,
  };
}

/** The 4 KiB header block, CRC included. */
export function encodeHeader(h: LogHeader): Buffer {
  const b = Buffer.alloc(HEADER_BYTES);
  LOG_MAGIC.copy(b, 0);
  b.writeUInt32LE(h.version, 8);
  b.writeUInt32LE(HEADER_BYTES, 12);
  h.uuid.copy(b, 16, 0, 16);
  putU64(b, 32, h.size);
  putU64(b, 40, h.dataSector);
  putU64(b, 48, h.checkpointSector);
  b.writeUInt32LE(h.slotSectors, 56);
  b.writeUInt32LE(h.slots, 60);
  putU64(b, 64, h.created);
  b.writeUInt32LE(crc32c(b.subarray(0, BLOCK_CRC_AT)), BLOCK_CRC_AT);
  return b;
}

/** What the first 4 KiB at dev_start hold. */
export type HeaderRead =
  | { readonly kind: 'ok'; readonly header: LogHeader }
  /** the magic bytes are all zero: no log was ever made here */
  | { readonly kind: 'empty' }
  /** something else lives here */
  | { readonly kind: 'foreign'; readonly magic: Buffer }
  | { readonly kind: 'version'; readonly version: number }
  | { readonly kind: 'crc' }
  /** the CRC matches but a field makes no sense for this version */
  | { readonly kind: 'invalid'; readonly why: string };

/**
 * Classify a header block, in this order: magic, version (a later format keeps magic and
 * version where they are), CRC, then the fields version 1 fixes.
 */
export function decodeHeader(b: Buffer): HeaderRead {
  const magic = b.subarray(0, 8);
  if (!magic.equals(LOG_MAGIC)) {
    return magic.every((x) => x === 0) ? { kind: 'empty' } : { kind: 'foreign', magic: Buffer.from(magic) };
  }
  const version = b.readUInt32LE(8);
  if (version !== FORMAT_VERSION) return { kind: 'version', version };
  if (crc32c(b.subarray(0, BLOCK_CRC_AT)) !== b.readUInt32LE(BLOCK_CRC_AT)) return { kind: 'crc' };
  const header: LogHeader = {
    version, uuid: Buffer.from(b.subarray(16, 32)), size: getU64(b, 32), dataSector: getU64(b, 40),
    checkpointSector: getU64(b, 48), slotSectors: b.readUInt32LE(56), slots: b.readUInt32LE(60), created: getU64(b, 64),
  };
  if (b.readUInt32LE(12) !== HEADER_BYTES) return { kind: 'invalid', why: `header size ${b.readUInt32LE(12)}` };
  if (header.dataSector !== DATA_SECTOR || header.checkpointSector !== CHECKPOINT_SECTOR
    || header.slotSectors !== SLOT_SECTORS || header.slots !== SLOT_COUNT) {
    return { kind: 'invalid', why: 'layout fields differ from version 1' };
  }
  if (header.size < MIN_LOG_SECTORS) return { kind: 'invalid', why: `size ${header.size} below ${MIN_LOG_SECTORS} sectors` };
  return { kind: 'ok', header };
}

// ---------------------------------------------------------------------------------------
// Checkpoint slots

/** One checkpoint slot's contents: the caller's state and where the ring's tail is. */
export interface Checkpoint {
  /** increases by one per checkpoint written; the valid slot with the highest one wins */
  readonly generation: number;
  /** written when the log was created: there is no caller state yet */
  readonly initial: boolean;
  readonly state: CheckpointState;
  /** seq of the oldest kept entry (head + 1 when the ring was empty) */
  readonly tailSeq: number;
  /** ring offset of that entry's header, or of the wrap marker before it */
  readonly tailOffset: number;
  /** CRC of entry tailSeq − 1 (0 for seq 1): the tail entry's back link */
  readonly tailPrevCrc: number;
  readonly time: number;
}

/** The checkpoint a new log is created with: generation 1, tail seq 1 at offset 0, no state. */
export function initialCheckpoint(time: number): Checkpoint {
  return { generation: 1, initial: true, state: { localDone: 0, slinks: [] }, tailSeq: 1, tailOffset: 0, tailPrevCrc: 0, time };
}

/** The 4 KiB slot block for `cp` of the log `uuid`, CRC included. */
export function encodeCheckpoint(cp: Checkpoint, uuid: Buffer): Buffer {
  const slinks = cp.state.slinks;
  if (slinks.length > MAX_SLINKS) throw new RangeError(`at most ${MAX_SLINKS} slinks fit in a checkpoint`);
  const b = Buffer.alloc(SLOT_BYTES);
  CHECKPOINT_MAGIC.copy(b, 0);
  b.writeUInt32LE(cp.initial ? CHECKPOINT_INITIAL : 0, 8);
  b.writeUInt32LE(slinks.length, 12);
  uuid.copy(b, 16, 0, 16);
  putU64(b, 32, cp.generation);
  putU64(b, 40, cp.state.localDone);
  putU64(b, 48, cp.tailSeq);
  putU64(b, 56, cp.tailOffset);
  b.writeUInt32LE(cp.tailPrevCrc >>> 0, 64);
  putU64(b, 72, cp.time);
  slinks.forEach((s, i) => {
    const at = SLINKS_AT + i * SLINK_BYTES;
    b.writeUInt32LE(s.slink, at);
    b[at + 4] = s.mode === 'log' ? 1 : 0;
    putU64(b, at + 8, s.seq);
  });
  putU64(b, EPOCH_AT, cp.state.epoch ?? 0);
  setBits(b, VERIFY_AT, cp.state.verify ?? []);
  if (cp.state.boot) b.write(cp.state.boot, BOOT_AT, 16, 'hex');
  b[QUIESCED_AT] = cp.state.quiesced ? 1 : 0;
  setBits(b, DEVICES_AT, cp.state.devices ?? []);
  setBits(b, FORGOTTEN_AT, cp.state.forgotten ?? []);
  const left = cp.state.left ?? [];
  if (left.length > MAX_LEFT) throw new RangeError(`at most ${MAX_LEFT} devices that left fit in a checkpoint`);
  b.writeUInt32LE(left.length, LEFT_COUNT_AT);
  left.forEach((l, i) => {
    b.writeUInt32LE(l.dev, LEFT_AT + i * LEFT_BYTES);
    putU64(b, LEFT_AT + i * LEFT_BYTES + 4, l.seq);
  });
  const act = cp.state.activity;
  if (act) {
    if (act.extents.length > CHECKPOINT_MAX_ACTIVE) throw new RangeError(`at most ${CHECKPOINT_MAX_ACTIVE} activity-log extents fit in a checkpoint`);
    b.writeUInt32LE(act.extents.length, ACTIVE_COUNT_AT);
    b[ACTIVE_FLAGS_AT] = ACTIVE_KEPT | (act.incomplete ? ACTIVE_INCOMPLETE : 0);
    act.extents.forEach((k, i) => b.writeUInt32LE(k, ACTIVE_AT + i * 4));
  }
  b.writeUInt32LE(crc32c(b.subarray(0, BLOCK_CRC_AT)), BLOCK_CRC_AT);
  return b;
}

/** A slot's checkpoint, or null when the slot is empty, torn, corrupt or another log's. */
export function decodeCheckpoint(b: Buffer, uuid: Buffer): Checkpoint | null {
  if (!b.subarray(0, 8).equals(CHECKPOINT_MAGIC)) return null;
  if (crc32c(b.subarray(0, BLOCK_CRC_AT)) !== b.readUInt32LE(BLOCK_CRC_AT)) return null;
  if (b.compare(uuid, 0, 16, 16, 32) !== 0) return null;
  const count = b.readUInt32LE(12);
  if (count > MAX_SLINKS) return null;
  const slinks: SlinkPosition[] = [];
  for (let i = 0; i < count; i++) {
    const at = SLINKS_AT + i * SLINK_BYTES;
    const mode = b[at + 4];
    const seq = getU64(b, at + 8);
    if ((mode !== 0 && mode !== 1) || seq < 0) return null;
    slinks.push({ slink: b.readUInt32LE(at), seq, mode: mode === 1 ? 'log' : 'ship' });
  }
  const leftCount = b.readUInt32LE(LEFT_COUNT_AT);
  if (leftCount > MAX_LEFT) return null;
  const left: Array<{ dev: number; seq: number }> = [];
  for (let i = 0; i < leftCount; i++) {
    const dev = b.readUInt32LE(LEFT_AT + i * LEFT_BYTES);
    const seq = getU64(b, LEFT_AT + i * LEFT_BYTES + 4);
    if (dev > 255 || seq < 0) return null;
    left.push({ dev, seq });
  }
  const activeCount = b.readUInt32LE(ACTIVE_COUNT_AT);
  const activeFlags = b[ACTIVE_FLAGS_AT]!;
  if (activeCount > CHECKPOINT_MAX_ACTIVE || activeFlags > (ACTIVE_KEPT | ACTIVE_INCOMPLETE) || (activeFlags === 0 && activeCount > 0)) return null;
  const extents: number[] = [];
  for (let i = 0; i < activeCount; i++) extents.push(b.readUInt32LE(ACTIVE_AT + i * 4));
  const activity = activeFlags & ACTIVE_KEPT ? { extents, incomplete: (activeFlags & ACTIVE_INCOMPLETE) !== 0 } : undefined;
  const cp: Checkpoint = {
    generation: getU64(b, 32), initial: (b.readUInt32LE(8) & CHECKPOINT_INITIAL) !== 0,
    state: {
      localDone: getU64(b, 40), slinks,
      ...optional({
        epoch: getU64(b, EPOCH_AT), verify: bitsOf(b.subarray(VERIFY_AT, VERIFY_AT + 8)), boot: b.toString('hex', BOOT_AT, BOOT_AT + 16),
        quiesced: b[QUIESCED_AT] === 1, devices: bitsOf(b.subarray(DEVICES_AT, DEVICES_AT + 32)),
        left, forgotten: bitsOf(b.subarray(FORGOTTEN_AT, FORGOTTEN_AT + 32)), activity,
      }),
    },
    tailSeq: getU64(b, 48), tailOffset: getU64(b, 56),
    tailPrevCrc: b.readUInt32LE(64), time: getU64(b, 72),
  };
  if (cp.generation < 0 || (cp.state.epoch ?? 0) < 0 || cp.state.localDone < 0 || cp.tailSeq < 1 || cp.tailOffset < 0 || cp.tailOffset % 512 !== 0) return null;
  return cp;
}

type Optional = Pick<CheckpointState, 'epoch' | 'verify' | 'boot' | 'quiesced' | 'devices' | 'left' | 'forgotten' | 'activity'>;

/** a state's optional members, only those set (0, empty, a boot id of zeroes and false leave theirs out, as a caller that keeps none wrote it; an activity log kept is kept, empty or not) */
export function optional(o: Optional): Optional {
  return {
    ...(o.epoch ? { epoch: o.epoch } : {}), ...(o.verify?.length ? { verify: o.verify } : {}),
    ...(o.boot && /[1-9a-f]/.test(o.boot) ? { boot: o.boot } : {}), ...(o.quiesced ? { quiesced: true } : {}), ...(o.devices?.length ? { devices: o.devices } : {}),
    ...(o.left?.length ? { left: o.left } : {}), ...(o.forgotten?.length ? { forgotten: o.forgotten } : {}),
    ...(o.activity ? { activity: o.activity } : {}),
  };
}

/** set bit n (byte at + n >> 3, bit n & 7) for each n of `list` */
function setBits(b: Buffer, at: number, list: readonly number[]): void {
  for (const n of list) b[at + (n >> 3)]! |= 1 << (n & 7);
}

/** the set bits of `b` (bit n: byte n >> 3, bit n & 7), in order */
function bitsOf(b: Buffer): number[] {
  const out: number[] = [];
  for (let n = 0; n < b.length * 8; n++) if (b[n >> 3]! & (1 << (n & 7))) out.push(n);
  return out;
}

// ---------------------------------------------------------------------------------------
// Entries

/** What `encodeEntryHeader` writes (the CRC is `sealEntry`'s). */
export interface EntryFields {
  readonly op: ReplogOp;
  readonly fua: boolean;
  readonly devNr: number;
  readonly payloadBytes: number;
  readonly seq: number;
  readonly epoch: number;
  readonly sector: number;
  readonly sectors: number;
  readonly time: number;
  readonly prevCrc: number;
}

/** An entry header: one replicated write (or discard, write-zeroes, flush) and its payload size. */
export interface EntryHeader extends EntryFields {
  readonly kind: 'entry';
  readonly crc: number;
}

/** A wrap marker: entry `seq` follows at ring offset 0 (the rest of the ring is unused this lap). */
export interface WrapMarker {
  readonly kind: 'wrap';
  readonly seq: number;
  readonly payloadBytes: 0;
  readonly crc: number;
}

/** What a 512-byte header position in the ring holds when it is one of this log's. */
export type RingRecord = EntryHeader | WrapMarker;

/** Write an entry header at b[0…512) (the rest of the 512 bytes zeroed); CRC not yet set. */
export function encodeEntryHeader(b: Buffer, f: EntryFields, uuid: Buffer): void {
  b.fill(0, 0, ENTRY_HEADER_BYTES);
  b.writeUInt32LE(ENTRY_MAGIC, 0);
  b[8] = KIND_ENTRY;
  b[9] = OP_CODES[f.op];
  b[10] = f.fua ? FLAG_FUA : 0;
  b[11] = f.devNr;
  b.writeUInt32LE(f.payloadBytes, 12);
  uuid.copy(b, 16, 0, 16);
  putU64(b, 32, f.seq);
  putU64(b, 40, f.epoch);
  putU64(b, 48, f.sector);
  putU64(b, 56, f.sectors);
  putU64(b, 64, f.time);
  b.writeUInt32LE(f.prevCrc >>> 0, 72);
}

/** A 512-byte wrap marker, sealed: "entry `seq` is at ring offset 0". */
export function encodeWrapMarker(seq: number, uuid: Buffer): Buffer {
  const b = Buffer.alloc(ENTRY_HEADER_BYTES);
  b.writeUInt32LE(ENTRY_MAGIC, 0);
  b[8] = KIND_WRAP;
  uuid.copy(b, 16, 0, 16);
  putU64(b, 32, seq);
  sealEntry(b, 0, null);
  return b;
}

/**
 * The entry CRC: bytes 8–511 of the header at `b[at…]`, then the payload, which is either
 * `payload` or (null) the bytes following the header in `b` (`payloadBytes` of them).
 */
export function entryCrc(b: Buffer, at: number, payload: Buffer | null): number {
  if (payload) return crc32c(payload, entrySeed(b, at));
  const len = b.readUInt32LE(at + 12);
  return crc32c(b.subarray(at + ENTRY_CRC_FROM, at + ENTRY_HEADER_BYTES + len));
}

/** The entry CRC of the header at `b[at…]` alone: the seed its payload's CRC continues from. */
export function entrySeed(b: Buffer, at: number): number {
  return crc32c(b.subarray(at + ENTRY_CRC_FROM, at + ENTRY_HEADER_BYTES));
}

/** Compute and store the CRC of the encoded header at `b[at…]`; returns it. */
export function sealEntry(b: Buffer, at: number, payload: Buffer | null): number {
  const crc = entryCrc(b, at, payload);
  b.writeUInt32LE(crc, at + ENTRY_CRC_AT);
  return crc;
}

/** `sealEntry` with the header's CRC already known (`entrySeed`) and the payload given. */
export function sealEntryFrom(b: Buffer, at: number, seed: number, payload: Buffer): number {
  const crc = crc32c(payload, seed);
  b.writeUInt32LE(crc, at + ENTRY_CRC_AT);
  return crc;
}

/**
 * The record at `b[at…at+512)` if it is one of log `uuid`'s (magic, uuid, kind, op and
 * integer ranges checked; the CRC is not: see `entryCrc`), else null.
 */
export function decodeEntryHeader(b: Buffer, at: number, uuid: Buffer): RingRecord | null {
  if (b.readUInt32LE(at) !== ENTRY_MAGIC) return null;
  if (b.compare(uuid, 0, 16, at + 16, at + 32) !== 0) return null;
  const seq = getU64(b, at + 32);
  const payloadBytes = b.readUInt32LE(at + 12);
  const crc = b.readUInt32LE(at + ENTRY_CRC_AT);
  if (seq < 1) return null;
  const kind = b[at + 8];
  if (kind === KIND_WRAP) return payloadBytes === 0 ? { kind: 'wrap', seq, payloadBytes: 0, crc } : null;
  const op = OPS[b[at + 9]!];
  if (kind !== KIND_ENTRY || op === undefined) return null;
  const h: EntryHeader = {
    kind: 'entry', op, fua: (b[at + 10]! & FLAG_FUA) !== 0, devNr: b[at + 11]!, payloadBytes, seq,
    epoch: getU64(b, at + 40), sector: getU64(b, at + 48), sectors: getU64(b, at + 56), time: getU64(b, at + 64),
    prevCrc: b.readUInt32LE(at + 72), crc,
  };
  if (h.epoch < 0 || h.sector < 0 || h.sectors < 0 || h.time < 0) return null;
  // the payload length as append makes it (checked before it is read: a damaged length must
  // not make a reader allocate or read far past the entry)
  return payloadBytes === (op === 'write' ? h.sectors * 512 : 0) ? h : null;
}

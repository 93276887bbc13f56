/**
 * dmkit's replication protocol (the `tcp` slink and the receiving daemon): frames, their
 * header and CRCs, and the payloads of each frame type. The format is documented in
 * docs/formats/replication-protocol.md; this file is its codec and nothing else.
 *
 * Every frame is a 32-byte header and `length` payload bytes, big-endian:
 *
 *    0 u32 magic 'DMKR'     4 u8 type   5 u8 flags   6 u16 reserved (0)
 *    8 u64 id (a request's id; its reply echoes it)
 *   16 u32 payload length  20 u32 payload CRC32C (0 when integrity is off)
 *   24 u32 header CRC32C over bytes 0 … 23       28 u32 reserved (0)
 *
 * A header whose CRC or magic is wrong cannot be trusted to frame what follows: the
 * connection is dropped (and the sender re-sends on a new one). A payload whose CRC is
 * wrong under a good header is answered with RESEND for its id.
 *
 * A seeded IO frame (flag FLAG_SEEDED, feature 'entry-crc') carries a log entry's payload
 * with the CRC the replication log sealed it with: its sub-header holds the log's seed, and
 * its payload CRC is crc32c(sub-header, crc32c(data, seed)), which the sender derives from
 * the log's crc32c(data, seed) without reading the data (`encodeHeader`'s `dataCrc`).
 */
import { crc32c } from '@node-rs/crc32';
import { DmError } from '../core/errors.ts';
import { readU64BE, writeU64BE } from '../core/u64.ts';

export const MAGIC = 0x444d4b52; // 'DMKR'
export const HEADER_SIZE = 32;
/** protocol versions this build speaks */
export const MIN_VERSION = 1;
export const MAX_VERSION = 1;
/** the largest data payload of one IO frame; bigger bios are split by the sender */
export const MAX_DATA = 4 * 1024 * 1024;
/** the largest payload of any frame (an IO frame's sub-header and data, or a control frame) */
export const MAX_PAYLOAD = MAX_DATA + 64;
/** control (JSON) payloads are small */
export const MAX_CONTROL = 64 * 1024;

export const enum FrameType {
  HELLO = 1, HELLO_REPLY = 2, AUTH_CHALLENGE = 3, AUTH_RESPONSE = 4, AUTH_PROOF = 5, AUTH_OK = 6,
  ERROR = 7, OPEN = 8, OPEN_OK = 9, CLOSE = 10, IO = 11, ACK = 12, DATA = 13, RESEND = 14,
  PING = 15, PONG = 16, DIGEST = 17, STATE = 18, RESTART = 19, REWIND = 20,
}

/** frame flags: the payload carries no CRC (integrity=none) */
export const FLAG_NO_CRC = 1;
/**
 * frame flags: a seeded IO frame (feature 'entry-crc'): its 44-byte sub-header ends with
 * the seed, and its payload CRC is `seededCrc(sub, crc32c(data, seed))`
 */
export const FLAG_SEEDED = 2;
/** the feature that lets the sender send seeded IO frames */
export const ENTRY_CRC = 'entry-crc';

export interface FrameHeader {
  readonly type: number;
  readonly flags: number;
  readonly id: number;
  readonly length: number;
  readonly crc: number;
}

/** A frame the peer sent that breaks the protocol: the connection is dropped with this message. */
export class ProtocolError extends DmError {
  constructor(message: string) {
    super('EPROTO', message);
  }
}

/**
 * The 32-byte header of a frame whose payload is `parts` (CRC'd unless `noCrc`). With
 * `dataCrc`, a seeded IO frame: `parts` are its seeded sub-header and its data, `dataCrc` is
 * crc32c(data, the sub-header's seed), and the payload CRC is derived from it without
 * reading the data (`seededCrc`).
 */
export function encodeHeader(type: number, id: number, parts: readonly Buffer[], noCrc = false, dataCrc?: number): Buffer {
  const h = Buffer.allocUnsafe(HEADER_SIZE);
  const seeded = dataCrc !== undefined;
  let length = 0;
  let crc = 0;
  for (const p of parts) {
    length += p.length;
    if (!noCrc && !seeded) crc = crc32c(p, crc);
  }
  if (seeded) {
    if (type !== FrameType.IO || noCrc || parts.length < 1 || parts[0]!.length !== IO_HEADER_SEEDED) throw new Error('a seeded frame is an IO frame with a CRC and a seeded sub-header');
    crc = seededCrc(parts[0]!, dataCrc);
  }
  h.writeUInt32BE(MAGIC, 0);
  h.writeUInt8(type, 4);
  h.writeUInt8(noCrc ? FLAG_NO_CRC : seeded ? FLAG_SEEDED : 0, 5);
  h.writeUInt16BE(0, 6);
  writeU64BE(h, id, 8);
  h.writeUInt32BE(length, 16);
  h.writeUInt32BE(crc >>> 0, 20);
  h.writeUInt32BE(crc32c(h.subarray(0, 24)) >>> 0, 24);
  h.writeUInt32BE(0, 28);
  return h;
}

/** decode and check a header: magic, header CRC, length within `maxPayload` */
export function decodeHeader(b: Buffer, maxPayload = MAX_PAYLOAD): FrameHeader {
  const magic = b.readUInt32BE(0);
  if (magic !== MAGIC) throw new ProtocolError(`bad frame magic 0x${magic.toString(16).padStart(8, '0')} (expected 0x${MAGIC.toString(16)})`);
  const want = b.readUInt32BE(24);
  const got = crc32c(b.subarray(0, 24)) >>> 0;
  if (want !== got) throw new ProtocolError(`frame header CRC mismatch (header says 0x${want.toString(16)}, computed 0x${got.toString(16)})`);
  if (b.readUInt32BE(28) !== 0 || b.readUInt16BE(6) !== 0) throw new ProtocolError('frame header: reserved bytes (6-7, 28-31) are not zero');
  const length = b.readUInt32BE(16);
  if (length > maxPayload) throw new ProtocolError(`frame of ${length} bytes is over the limit of ${maxPayload}`);
  const id = readU64BE(b, 8);
  if (id < 0) throw new ProtocolError(`frame id ${b.readBigUInt64BE(8)} is out of range`);
  return { type: b.readUInt8(4), flags: b.readUInt8(5), id, length, crc: b.readUInt32BE(20) };
}

/**
 * Why a header with FLAG_SEEDED cannot be a seeded frame (a ProtocolError), checked before its
 * payload is read: on a connection without the feature 'entry-crc' (`allowed` false), on a
 * frame other than IO, with NO_CRC too, or with a payload shorter than the seeded sub-header.
 */
export function checkSeeded(h: FrameHeader, allowed: boolean): void {
  if ((h.flags & FLAG_SEEDED) === 0) return;
  const what = `frame ${h.id} (type ${h.type}) has flag bit 1 (seeded CRC)`;
  if (!allowed) throw new ProtocolError(`${what} on a connection without the feature ${ENTRY_CRC}`);
  if (h.type !== FrameType.IO) throw new ProtocolError(`${what}, which only IO frames may carry`);
  if ((h.flags & FLAG_NO_CRC) !== 0) throw new ProtocolError(`${what} and bit 0 (no CRC) together`);
  if (h.length < IO_HEADER_SEEDED) throw new ProtocolError(`seeded IO frame ${h.id} of ${h.length} bytes is shorter than its ${IO_HEADER_SEEDED}-byte sub-header`);
}

/** a seeded IO frame's payload CRC: crc32c over the sub-header `sub`, continuing from `dataCrc` = crc32c(data, seed) */
export function seededCrc(sub: Buffer, dataCrc: number): number {
  return crc32c(sub, dataCrc) >>> 0;
}

/**
 * Does `payload` match its header's CRC (always, when the frame carries none)? A seeded IO
 * frame's is `seededCrc(sub, crc32c(data, seed))`, the seed read from its sub-header (a
 * malformed seeded header is a ProtocolError: `checkSeeded`).
 */
export function payloadOk(h: FrameHeader, payload: Buffer): boolean {
  if ((h.flags & FLAG_SEEDED) !== 0) {
    checkSeeded(h, true);
    const sub = payload.subarray(0, IO_HEADER_SEEDED);
    return seededCrc(sub, crc32c(payload.subarray(IO_HEADER_SEEDED), sub.readUInt32BE(IO_HEADER)) >>> 0) === h.crc;
  }
  return (h.flags & FLAG_NO_CRC) !== 0 || (crc32c(payload) >>> 0) === h.crc;
}

// --- IO frames -------------------------------------------------------------------------

export const IO_HEADER = 40;
/** a seeded IO frame's sub-header: the 40 bytes, then the u32 seed */
export const IO_HEADER_SEEDED = IO_HEADER + 4;
export const enum IoOp { WRITE = 0, DISCARD = 1, WRITE_ZEROES = 2, FLUSH = 3, READ = 4 }
export const IO_FUA = 1;
export const IO_NOUNMAP = 2;
export const enum Codec { NONE = 0, LZ4 = 1, ZSTD = 2 }

/**
 * An IO request: the sub-header before the data.
 *
 *    0 u32 handle (from OPEN_OK)   4 u8 op   5 u8 flags (fua, nounmap)   6 u8 codec   7 u8 0
 *    8 u64 seq (0: not from the log: resync, tests)   16 u64 epoch   24 u64 sector
 *   32 u32 sectors   36 u32 data bytes before compression (writes; 0 otherwise)
 *   40 u32 seed (seeded frames only: an uncompressed write whose data CRC continues from it)
 */
export interface IoRequest {
  readonly handle: number;
  readonly op: IoOp;
  readonly flags: number;
  readonly codec: Codec;
  readonly seq: number;
  readonly epoch: number;
  readonly sector: number;
  readonly sectors: number;
  readonly rawBytes: number;
  /** a seeded frame's seed (FLAG_SEEDED): the data's CRC is crc32c(data, seed); absent otherwise */
  readonly seed?: number;
}

/** the sub-header's size: IO_HEADER, or IO_HEADER_SEEDED with a seed */
export function ioHeaderSize(r: IoRequest): number {
  return r.seed === undefined ? IO_HEADER : IO_HEADER_SEEDED;
}

export function encodeIo(r: IoRequest): Buffer {
  const b = Buffer.allocUnsafe(ioHeaderSize(r));
  if (r.seed !== undefined) b.writeUInt32BE(r.seed >>> 0, IO_HEADER);
  b.writeUInt32BE(r.handle, 0);
  b.writeUInt8(r.op, 4);
  b.writeUInt8(r.flags, 5);
  b.writeUInt8(r.codec, 6);
  b.writeUInt8(0, 7);
  writeU64BE(b, r.seq, 8);
  writeU64BE(b, r.epoch, 16);
  writeU64BE(b, r.sector, 24);
  b.writeUInt32BE(r.sectors, 32);
  b.writeUInt32BE(r.rawBytes, 36);
  return b;
}

/**
 * Decode an IO payload's sub-header (the seeded one of a frame with FLAG_SEEDED); throws
 * ProtocolError for an impossible one. A seeded frame is an uncompressed write.
 */
export function decodeIo(p: Buffer, seeded = false): IoRequest {
  const size = seeded ? IO_HEADER_SEEDED : IO_HEADER;
  if (p.length < size) throw new ProtocolError(`${seeded ? 'seeded ' : ''}IO frame of ${p.length} bytes is shorter than its ${size}-byte header`);
  const op = p.readUInt8(4);
  const codec = p.readUInt8(6);
  if (op > IoOp.READ) throw new ProtocolError(`IO frame: unknown op ${op}`);
  if (codec > Codec.ZSTD) throw new ProtocolError(`IO frame: unknown codec ${codec}`);
  const big = (o: number): number => {
    const v = readU64BE(p, o);
    if (v < 0) throw new ProtocolError(`IO frame: value ${p.readBigUInt64BE(o)} at byte ${o} is out of range`);
    return v;
  };
  const r: IoRequest = {
    handle: p.readUInt32BE(0), op, flags: p.readUInt8(5), codec, seq: big(8), epoch: big(16), sector: big(24),
    sectors: p.readUInt32BE(32), rawBytes: p.readUInt32BE(36), ...(seeded ? { seed: p.readUInt32BE(IO_HEADER) } : {}),
  };
  if (seeded && (op !== IoOp.WRITE || codec !== Codec.NONE)) {
    throw new ProtocolError(`seeded IO frame: op ${op}, codec ${codec} (expected an uncompressed write: op 0, codec 0)`);
  }
  const dataBytes = p.length - size;
  if (op === IoOp.WRITE) {
    if (r.rawBytes !== r.sectors * 512 || r.rawBytes > MAX_DATA || r.sectors === 0) {
      throw new ProtocolError(`IO frame: write of ${r.sectors} sectors says ${r.rawBytes} data bytes`);
    }
    if (codec === Codec.NONE && dataBytes !== r.rawBytes) {
      throw new ProtocolError(`IO frame: write of ${r.rawBytes} bytes carries ${dataBytes}`);
    }
  } else if (dataBytes !== 0 || codec !== Codec.NONE) {
    throw new ProtocolError(`IO frame: op ${op} carries ${dataBytes} data bytes (expected none)`);
  } else if (op === IoOp.READ && (r.sectors === 0 || r.sectors * 512 > MAX_DATA)) {
    throw new ProtocolError(`IO frame: read of ${r.sectors} sectors (expected 1 … ${MAX_DATA / 512})`);
  }
  return r;
}

// --- RESTART frames (feature 'pipeline', negotiated in HELLO) ----------------------------

/** RESTART's payload: the seq the sender's shipping starts over from (u64) */
export const RESTART_SIZE = 8;

export function encodeRestart(seq: number): Buffer {
  const b = Buffer.allocUnsafe(RESTART_SIZE);
  writeU64BE(b, seq, 0);
  return b;
}

/** the seq of a RESTART payload; throws ProtocolError for a malformed one */
export function decodeRestart(p: Buffer): number {
  if (p.length !== RESTART_SIZE) throw new ProtocolError(`RESTART frame of ${p.length} bytes (expected ${RESTART_SIZE})`);
  const seq = readU64BE(p, 0);
  if (seq < 1) throw new ProtocolError(`RESTART frame: seq ${p.readBigUInt64BE(0)} is out of range (expected 1 … 2^53-1)`);
  return seq;
}

// --- DIGEST frames (feature 'digest', negotiated in HELLO) -------------------------------

/** the feature names this build offers in HELLO / HELLO_REPLY */
export const FEATURES: readonly string[] = ['digest', ENTRY_CRC, 'pipeline', 'roles', 'rewind'];
export const DIGEST_HEADER = 24;
/** bytes of one block's digest in the DATA reply (xxh3-128) */
export const DIGEST_SIZE = 16;
/** the most sectors one DIGEST may cover (the receiver reads them at once): one IO frame's worth */
export const MAX_DIGEST_SECTORS = MAX_DATA / 512;
/** block sizes a DIGEST may ask for, in sectors: a power of two from 4 KiB to MAX_DIGEST_SECTORS */
export const MIN_DIGEST_BLOCK = 8;

/**
 * A DIGEST request: the digests of `sectors` sectors from `sector` on, in blocks of
 * `blockSectors`, answered with DATA (16 bytes per block, the last block may be short) or ERROR.
 *
 *    0 u32 handle (from OPEN_OK)   4 u32 blockSectors   8 u64 sector   16 u32 sectors   20 u32 0
 */
export interface DigestRequest {
  readonly handle: number;
  readonly sector: number;
  readonly sectors: number;
  readonly blockSectors: number;
}

export function encodeDigest(r: DigestRequest): Buffer {
  const b = Buffer.allocUnsafe(DIGEST_HEADER);
  b.writeUInt32BE(r.handle, 0);
  b.writeUInt32BE(r.blockSectors, 4);
  writeU64BE(b, r.sector, 8);
  b.writeUInt32BE(r.sectors, 16);
  b.writeUInt32BE(0, 20);
  return b;
}

/** decode a DIGEST payload; throws ProtocolError when it cannot be one (its values are checked by `digestProblem`) */
export function decodeDigest(p: Buffer): DigestRequest {
  if (p.length !== DIGEST_HEADER) throw new ProtocolError(`DIGEST frame of ${p.length} bytes (expected ${DIGEST_HEADER})`);
  if (p.readUInt32BE(20) !== 0) throw new ProtocolError('DIGEST frame: reserved bytes 20-23 are not zero');
  const sector = readU64BE(p, 8);
  if (sector < 0) throw new ProtocolError(`DIGEST frame: sector ${p.readBigUInt64BE(8)} is out of range`);
  return { handle: p.readUInt32BE(0), blockSectors: p.readUInt32BE(4), sector, sectors: p.readUInt32BE(16) };
}

/** why a DIGEST of a device of `deviceSectors` cannot be answered (EINVAL), or null */
export function digestProblem(r: DigestRequest, deviceSectors: number): string | null {
  const b = r.blockSectors;
  if (b < MIN_DIGEST_BLOCK || b > MAX_DIGEST_SECTORS || (b & (b - 1)) !== 0) {
    return `DIGEST block of ${b} sectors (expected a power of two from ${MIN_DIGEST_BLOCK} to ${MAX_DIGEST_SECTORS})`;
  }
  if (r.sectors === 0 || r.sectors > MAX_DIGEST_SECTORS) return `DIGEST of ${r.sectors} sectors (expected 1 … ${MAX_DIGEST_SECTORS})`;
  if (r.sector + r.sectors > deviceSectors) return `DIGEST of sectors ${r.sector} … ${r.sector + r.sectors - 1} is beyond the device's ${deviceSectors} sectors`;
  return null;
}

// --- control frames (JSON objects) ------------------------------------------------------

/** a control frame's payload */
export function encodeJson(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value), 'utf8');
}

/** decode a control payload as an object; throws ProtocolError when it is not one */
export function decodeJson(p: Buffer, what: string): Record<string, unknown> {
  if (p.length > MAX_CONTROL) throw new ProtocolError(`${what}: ${p.length} bytes is over the ${MAX_CONTROL}-byte limit for control frames`);
  let v: unknown;
  try {
    v = JSON.parse(p.toString('utf8'));
  } catch {
    throw new ProtocolError(`${what}: payload is not JSON`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ProtocolError(`${what}: payload is not an object`);
  return v as Record<string, unknown>;
}

/** field readers for control payloads: a missing or mistyped field is a ProtocolError naming it */
export function str(o: Record<string, unknown>, key: string, what: string, max = 4096): string {
  const v = o[key];
  if (typeof v !== 'string' || v.length > max) throw new ProtocolError(`${what}: '${key}' must be a string of at most ${max} characters`);
  return v;
}
export function uint(o: Record<string, unknown>, key: string, what: string): number {
  const v = o[key];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new ProtocolError(`${what}: '${key}' must be an unsigned integer`);
  return v;
}
export function bool(o: Record<string, unknown>, key: string, what: string): boolean {
  const v = o[key];
  if (typeof v !== 'boolean') throw new ProtocolError(`${what}: '${key}' must be true or false`);
  return v;
}
export function hex(o: Record<string, unknown>, key: string, what: string, bytes: number): Buffer {
  const v = o[key];
  if (typeof v !== 'string' || v.length !== bytes * 2 || !/^[0-9a-f]+$/.test(v)) {
    throw new ProtocolError(`${what}: '${key}' must be ${bytes} bytes in lowercase hex`);
  }
  return Buffer.from(v, 'hex');
}

/** an ERROR frame's payload: an errno code name and a message */
export function encodeError(code: string, message: string, verdict?: string): Buffer {
  return encodeJson({ code, message: message.slice(0, 1024), ...(verdict ? { verdict } : {}) });
}

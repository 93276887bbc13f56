/**
 * Client side of the NBD handshake: connect, fixed-newstyle greeting (C_FIXED_NEWSTYLE |
 * C_NO_ZEROES), STARTTLS with a pre-shared key for nbds URIs, STRUCTURED_REPLY,
 * SET_META_CONTEXT `base:allocation`, then GO with an INFO_BLOCK_SIZE request (falling back
 * to EXPORT_NAME when the server answers ERR_UNSUP, or when it is not fixed-newstyle).
 * Every step is bounded by one timeout and an abort signal; on any failure the socket is
 * destroyed and the promise rejects with a DmError whose code says what went wrong
 * (ENOENT no such export, EACCES TLS refused, EPROTO protocol violation, ETIMEDOUT, or the
 * socket's own ECONNREFUSED/ECONNRESET/…). `exportInfo` then checks what the server
 * sent (block sizes dmkit can honour) and derives the client's view of the export.
 */
import { readFileSync } from 'node:fs';
import net, { type Socket } from 'node:net';
import { userInfo } from 'node:os';
import tls from 'node:tls';
import { DmError } from '../core/errors.ts';
import {
  BLOCK_MAX, TFLAG_CAN_MULTI_CONN, TFLAG_READ_ONLY, TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FLUSH,
  TFLAG_SEND_FUA, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
  CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
  INFO_BLOCK_SIZE, INFO_EXPORT, META_BASE_ALLOCATION, NBD_MAGIC, OPT_EXPORT_NAME, OPT_GO,
  OPT_REPLY_MAGIC, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK,
  REP_ERR_POLICY, REP_ERR_SHUTDOWN, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO,
  REP_META_CONTEXT, optionName,
} from './constants.ts';
import { HandshakeReader } from './client-reader.ts';
import { describeEndpoint, type NbdEndpoint } from './client-uri.ts';

/** oldstyle servers send this instead of IHAVEOPT */
const OLDSTYLE_MAGIC = 0x00420281861253n;
/** option replies longer than this are a protocol violation */
const MAX_REPLY = 16 * 1024 * 1024;
/** TLS 1.2 PSK suites (GnuTLS/nbdkit and OpenSSL agree on these) and the TLS 1.3 suites */
const PSK_CIPHERS = [
  'PSK-AES256-GCM-SHA384', 'PSK-AES128-GCM-SHA256', 'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256', 'DHE-PSK-AES256-GCM-SHA384', 'DHE-PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305', 'ECDHE-PSK-CHACHA20-POLY1305',
].join(':');

export interface BlockSizes {
  min: number;
  preferred: number;
  max: number;
}

/** what the server told us about the export */
export interface ExportParams {
  /** bytes */
  size: number;
  /** transmission flags (TFLAG_*) */
  flags: number;
  /** structured replies negotiated */
  structured: boolean;
  /** id of `base:allocation`, or null if not negotiated */
  metaContextId: number | null;
  /** from INFO_BLOCK_SIZE, or null if the server sent none (EXPORT_NAME path) */
  blockSizes: BlockSizes | null;
}

export interface Negotiated extends ExportParams {
  /** the transmission socket (a TLSSocket after STARTTLS), paused, no listeners of ours */
  socket: Socket;
  /** bytes received after the handshake (normally empty) */
  leftover: Buffer;
}

export interface TlsPsk {
  identity: string;
  key: Buffer;
}

export interface HandshakeOptions {
  exportName: string;
  /** STARTTLS with this key (nbds URIs); TLS is then mandatory */
  tls?: TlsPsk;
  /** ask for `base:allocation` */
  metaContext: boolean;
  /** bound on connect + handshake */
  timeoutMs: number;
  signal?: AbortSignal;
}

function hsError(code: string, message: string, cause?: unknown): DmError {
  return new DmError(code, message, cause === undefined ? undefined : { cause });
}

/**
 * Read the key for `identity` (default: the local user, as libnbd) from an nbdkit-style PSK
 * file of `identity:hexkey` lines.
 */
export function loadPsk(file: string, identity?: string): TlsPsk {
  const id = identity ?? userInfo().username;
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw hsError('EACCES', `cannot read TLS PSK file ${file}: ${(err as Error).message}`, err);
  }
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === '' || line.startsWith('#')) continue;
    const colon = line.lastIndexOf(':');
    const hex = line.slice(colon + 1);
    if (colon <= 0 || hex.length === 0 || hex.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(hex)) {
      throw hsError('EINVAL', `TLS PSK file ${file}: line ${i + 1}: expected identity:hexkey`);
    }
    if (line.slice(0, colon) === id) return { identity: id, key: Buffer.from(hex, 'hex') };
  }
  throw hsError('EACCES', `TLS PSK file ${file} has no key for identity '${id}'`);
}

/** Connect to `endpoint` and negotiate; see the file comment for the sequence and errors. */
export async function handshake(endpoint: NbdEndpoint, opts: HandshakeOptions): Promise<Negotiated> {
  const where = describeEndpoint(endpoint);
  const held: Socket[] = [];
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  const guard = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(hsError('ETIMEDOUT', `${where}: NBD handshake timed out after ${opts.timeoutMs} ms`)), opts.timeoutMs);
    onAbort = () => reject(hsError('ECANCELED', `${where}: connection attempt cancelled`));
    if (opts.signal?.aborted) onAbort();
    opts.signal?.addEventListener('abort', onAbort);
  });
  const run = negotiate(endpoint, opts, held);
  run.catch(() => {});
  try {
    return await Promise.race([run, guard]);
  } catch (err) {
    for (const s of held) s.destroy();
    throw err instanceof DmError ? err : hsError('EIO', `${where}: ${(err as Error).message}`, err);
  } finally {
    clearTimeout(timer);
    if (onAbort) opts.signal?.removeEventListener('abort', onAbort);
  }
}

function connectSocket(endpoint: NbdEndpoint, held: Socket[]): Promise<Socket> {
  const sock = endpoint.kind === 'unix'
    ? net.connect({ path: endpoint.path })
    : net.connect({ host: endpoint.host, port: endpoint.port });
  held.push(sock);
  return new Promise((resolve, reject) => {
    sock.once('connect', () => {
      sock.off('error', onError);
      if (endpoint.kind === 'tcp') sock.setNoDelay(true);
      resolve(sock);
    });
    const onError = (err: NodeJS.ErrnoException): void => {
      reject(hsError(err.code ?? 'EIO', `cannot connect to NBD server ${describeEndpoint(endpoint)}: ${err.message}`, err));
    };
    sock.once('error', onError);
  });
}

async function negotiate(endpoint: NbdEndpoint, opts: HandshakeOptions, held: Socket[]): Promise<Negotiated> {
  const where = describeEndpoint(endpoint);
  let sock = await connectSocket(endpoint, held);
  let r = new HandshakeReader(sock, where);

  const greeting = await r.read(18);
  if (greeting.readBigUInt64BE(0) !== NBD_MAGIC) throw hsError('EPROTO', `${where} is not an NBD server (bad greeting magic)`);
  const style = greeting.readBigUInt64BE(8);
  if (style === OLDSTYLE_MAGIC) throw hsError('EPROTO', `${where}: oldstyle NBD servers are not supported`);
  if (style !== IHAVEOPT) throw hsError('EPROTO', `${where}: bad newstyle magic in greeting`);
  const serverFlags = greeting.readUInt16BE(16);
  const fixed = (serverFlags & FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (serverFlags & FLAG_NO_ZEROES) !== 0;
  const clientFlags = Buffer.allocUnsafe(4);
  clientFlags.writeUInt32BE((fixed ? CLIENT_FLAG_FIXED_NEWSTYLE : 0) | (noZeroes ? CLIENT_FLAG_NO_ZEROES : 0));
  sock.write(clientFlags);

  if (opts.tls) {
    if (!fixed) throw hsError('EACCES', `${where}: TLS requested but the server is not fixed-newstyle`);
    sendOption(sock, OPT_STARTTLS, EMPTY);
    const rep = await readReply(r, OPT_STARTTLS, where);
    if (rep.type !== REP_ACK) {
      throw hsError('EACCES', `${where}: server refused STARTTLS (${replyText(rep)}); it may not have TLS configured`);
    }
    const rest = r.detach();
    if (rest.length) throw hsError('EPROTO', `${where}: unexpected data after STARTTLS`);
    sock = await startTls(sock, opts.tls, where);
    held.push(sock);
    r = new HandshakeReader(sock, where);
  }

  let structured = false;
  let metaContextId: number | null = null;
  if (fixed) {
    sendOption(sock, OPT_STRUCTURED_REPLY, EMPTY);
    const rep = await readReply(r, OPT_STRUCTURED_REPLY, where);
    if (rep.type === REP_ERR_TLS_REQD) {
      throw hsError('EACCES', `${where}: server requires TLS (use an nbds:// or nbds+unix:// URI with tls-psk-file=FILE)`);
    }
    structured = rep.type === REP_ACK;
    if (structured && opts.metaContext) metaContextId = await setMetaContext(sock, r, opts.exportName, where);
    const go = await optGo(sock, r, opts.exportName, where);
    if (go) return { ...go, structured, metaContextId, socket: sock, leftover: r.detach() };
  }
  return { ...(await exportName(sock, r, opts.exportName, noZeroes, where)), structured, metaContextId, socket: sock, leftover: r.detach() };
}

/** the client side of a TLS-PSK handshake on a connected socket (NBD STARTTLS, replication) */
export function startTls(sock: Socket, psk: TlsPsk, where: string): Promise<Socket> {
  // failures of the raw socket surface on the TLS socket; never let them go unhandled here
  sock.on('error', () => {});
  return new Promise((resolve, reject) => {
    const t = tls.connect({
      socket: sock,
      ciphers: PSK_CIPHERS,
      minVersion: 'TLSv1.2',
      maxVersion: 'TLSv1.2',
      pskCallback: () => ({ identity: psk.identity, psk: psk.key }),
      checkServerIdentity: () => undefined,
    });
    const onError = (err: Error): void => {
      t.destroy();
      reject(hsError('EACCES', `${where}: TLS handshake failed (identity '${psk.identity}'): ${err.message}`, err));
    };
    t.once('error', onError);
    t.once('secureConnect', () => {
      t.off('error', onError);
      t.pause();
      resolve(t);
    });
  });
}

const EMPTY = Buffer.alloc(0);

function sendOption(sock: Socket, opt: number, data: Buffer): void {
  const h = Buffer.allocUnsafe(16);
  h.writeBigUInt64BE(IHAVEOPT, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(data.length, 12);
  sock.write(data.length ? Buffer.concat([h, data]) : h);
}

interface OptReply {
  type: number;
  data: Buffer;
}

async function readReply(r: HandshakeReader, opt: number, where: string): Promise<OptReply> {
  const h = await r.read(20);
  if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw hsError('EPROTO', `${where}: bad option reply magic`);
  if (h.readUInt32BE(8) !== opt) {
    throw hsError('EPROTO', `${where}: reply to ${optionName(h.readUInt32BE(8))} while waiting for ${optionName(opt)}`);
  }
  const type = h.readUInt32BE(12);
  const len = h.readUInt32BE(16);
  if (len > MAX_REPLY) throw hsError('EPROTO', `${where}: option reply of ${len} bytes`);
  return { type, data: len ? Buffer.from(await r.read(len)) : EMPTY };
}

function replyText(rep: OptReply): string {
  const names: Record<number, string> = {
    [REP_ERR_UNSUP]: 'unsupported', [REP_ERR_POLICY]: 'refused by policy', [REP_ERR_TLS_REQD]: 'TLS required',
    [REP_ERR_UNKNOWN]: 'unknown export', [REP_ERR_SHUTDOWN]: 'server shutting down',
  };
  const name = names[rep.type] ?? `reply 0x${rep.type.toString(16)}`;
  const msg = rep.type & 0x80000000 ? rep.data.toString('utf8') : '';
  return msg ? `${name}: ${msg}` : name;
}

/** name-plus-queries layout shared by GO/INFO and SET_META_CONTEXT */
function namePrefix(name: string, extra: number): { buf: Buffer; at: number } {
  const n = Buffer.byteLength(name);
  const buf = Buffer.alloc(4 + n + extra);
  buf.writeUInt32BE(n, 0);
  buf.write(name, 4, 'utf8');
  return { buf, at: 4 + n };
}

async function setMetaContext(sock: Socket, r: HandshakeReader, name: string, where: string): Promise<number | null> {
  const q = Buffer.from(META_BASE_ALLOCATION);
  const { buf, at } = namePrefix(name, 4 + 4 + q.length);
  buf.writeUInt32BE(1, at);
  buf.writeUInt32BE(q.length, at + 4);
  q.copy(buf, at + 8);
  sendOption(sock, OPT_SET_META_CONTEXT, buf);
  let id: number | null = null;
  for (;;) {
    const rep = await readReply(r, OPT_SET_META_CONTEXT, where);
    if (rep.type === REP_META_CONTEXT) {
      if (rep.data.length >= 4 && rep.data.subarray(4).toString('utf8') === META_BASE_ALLOCATION) id = rep.data.readUInt32BE(0);
      continue;
    }
    return rep.type === REP_ACK ? id : null;
  }
}

type ExportInfo = Pick<ExportParams, 'size' | 'flags' | 'blockSizes'>;

/** GO with INFO_BLOCK_SIZE; null when the server does not know GO (fall back to EXPORT_NAME) */
async function optGo(sock: Socket, r: HandshakeReader, name: string, where: string): Promise<ExportInfo | null> {
  const { buf, at } = namePrefix(name, 4);
  buf.writeUInt16BE(1, at);
  buf.writeUInt16BE(INFO_BLOCK_SIZE, at + 2);
  sendOption(sock, OPT_GO, buf);
  let size = -1;
  let flags = 0;
  let blockSizes: BlockSizes | null = null;
  for (;;) {
    const rep = await readReply(r, OPT_GO, where);
    if (rep.type === REP_INFO) {
      if (rep.data.length < 2) throw hsError('EPROTO', `${where}: short INFO reply`);
      const type = rep.data.readUInt16BE(0);
      if (type === INFO_EXPORT && rep.data.length >= 12) {
        size = toSafe(rep.data.readBigUInt64BE(2), where);
        flags = rep.data.readUInt16BE(10);
      } else if (type === INFO_BLOCK_SIZE && rep.data.length >= 14) {
        blockSizes = { min: rep.data.readUInt32BE(2), preferred: rep.data.readUInt32BE(6), max: rep.data.readUInt32BE(10) };
      }
      continue;
    }
    if (rep.type === REP_ACK) {
      if (size < 0) throw hsError('EPROTO', `${where}: GO succeeded without INFO_EXPORT`);
      return { size, flags, blockSizes };
    }
    if (rep.type === REP_ERR_UNSUP) return null;
    throw goError(rep, name, where);
  }
}

function goError(rep: OptReply, name: string, where: string): DmError {
  const text = `${where}: cannot open export '${name}': ${replyText(rep)}`;
  switch (rep.type) {
    case REP_ERR_UNKNOWN: return hsError('ENOENT', text);
    case REP_ERR_TLS_REQD: return hsError('EACCES', `${text} (use an nbds:// URI)`);
    case REP_ERR_POLICY: return hsError('EACCES', text);
    case REP_ERR_SHUTDOWN: return hsError('ESHUTDOWN', text);
    default: return hsError('EIO', text);
  }
}

async function exportName(sock: Socket, r: HandshakeReader, name: string, noZeroes: boolean, where: string): Promise<ExportInfo> {
  sendOption(sock, OPT_EXPORT_NAME, Buffer.from(name, 'utf8'));
  let b: Buffer;
  try {
    b = await r.read(noZeroes ? 10 : 134);
  } catch (err) {
    throw hsError('ENOENT', `${where}: server closed the connection after EXPORT_NAME '${name}' (no such export?)`, err);
  }
  return { size: toSafe(b.readBigUInt64BE(0), where), flags: b.readUInt16BE(8), blockSizes: null };
}

function toSafe(v: bigint, where: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw hsError('EPROTO', `${where}: export size ${v} is too large`);
  return Number(v);
}

export interface NbdExportInfo {
  /** bytes */
  readonly size: number;
  /** raw transmission flags */
  readonly flags: number;
  readonly readOnly: boolean;
  readonly canFlush: boolean;
  readonly canFua: boolean;
  readonly canTrim: boolean;
  readonly canWriteZeroes: boolean;
  readonly canFastZero: boolean;
  readonly canMultiConn: boolean;
  readonly structuredReplies: boolean;
  /** `base:allocation` negotiated: blockStatus() works */
  readonly blockStatus: boolean;
  /** as advertised, or the protocol defaults (1 / 4096 / 32 MiB) */
  readonly blockSizes: BlockSizes;
  /** READ/WRITE requests are split at this many bytes */
  readonly maxPayload: number;
}

/** validate what the server sent and derive the client's view; throws DmError */
export function exportInfo(p: ExportParams, label: string): NbdExportInfo {
  const f = p.flags;
  const bs = p.blockSizes ?? { min: 1, preferred: 4096, max: BLOCK_MAX };
  const pow2 = (x: number): boolean => x > 0 && (x & (x - 1)) === 0;
  if (p.blockSizes && (!pow2(bs.min) || bs.min > 65536 || !pow2(bs.preferred) || bs.max < bs.min)) {
    throw new DmError('EPROTO', `${label}: server sent invalid block sizes (min ${bs.min}, preferred ${bs.preferred}, max ${bs.max})`);
  }
  if (bs.min > 512) {
    throw new DmError('EINVAL', `${label}: export needs ${bs.min}-byte aligned I/O; dmkit devices use 512-byte sectors`);
  }
  const maxPayload = Math.floor(Math.min(bs.max, BLOCK_MAX) / 512) * 512;
  if (maxPayload < 512) throw new DmError('EINVAL', `${label}: server's maximum payload ${bs.max} is below one 512-byte sector`);
  return {
    size: p.size,
    flags: f,
    readOnly: (f & TFLAG_READ_ONLY) !== 0,
    canFlush: (f & TFLAG_SEND_FLUSH) !== 0,
    canFua: (f & TFLAG_SEND_FUA) !== 0,
    canTrim: (f & TFLAG_SEND_TRIM) !== 0,
    canWriteZeroes: (f & TFLAG_SEND_WRITE_ZEROES) !== 0,
    canFastZero: (f & TFLAG_SEND_WRITE_ZEROES) !== 0 && (f & TFLAG_SEND_FAST_ZERO) !== 0,
    canMultiConn: (f & TFLAG_CAN_MULTI_CONN) !== 0,
    structuredReplies: p.structured,
    blockStatus: p.metaContextId !== null,
    blockSizes: bs,
    maxPayload,
  };
}

/**
 * The fixed-newstyle handshake (NBD.md A.2): greeting, client flags, then options until
 * GO / EXPORT_NAME starts transmission or the client aborts. Protocol violations that leave
 * the stream unparseable (bad magic, hostile lengths, too many options, unknown client
 * flags) throw HandshakeError: the caller drops the connection. Everything else is answered
 * with an option reply and the loop continues.
 */
import type { Socket } from 'node:net';
import type { ExportHandle, ExportInfo, ExportProvider, NbdPeer } from './export.ts';
import { ByteReader } from './byte-reader.ts';
import * as C from './constants.ts';
import { startTls, type TlsServerConfig } from './tls.ts';

/** a handshake the server must abandon by dropping the connection */
export class HandshakeError extends Error {
  readonly code = 'EPROTO';
  constructor(message: string) {
    super(message);
    this.name = 'HandshakeError';
  }
}

/** what transmission starts from */
export interface Negotiated {
  /** the socket to use from now on (the TLS socket after STARTTLS) */
  socket: Socket;
  /** bytes already read past the end of the handshake */
  leftover: Buffer;
  handle: ExportHandle;
  name: string;
  structured: boolean;
  /** `base:allocation` was selected for this export */
  baseAllocation: boolean;
  flags: number;
  tls: boolean;
  via: 'go' | 'export-name';
}

export interface HandshakeOptions {
  provider: ExportProvider;
  /** the client, for whoever the export names as its opener */
  peer: NbdPeer;
  tls?: TlsServerConfig;
  /** server is shutting down: options get ERR_SHUTDOWN */
  isClosing?: () => boolean;
  /** the socket changed (STARTTLS): the caller tracks it for destroy() */
  onSocket?: (socket: Socket) => void;
}

interface State {
  socket: Socket;
  reader: ByteReader;
  noZeroes: boolean;
  structured: boolean;
  /** export the meta-context selection applies to, or null if none selected */
  metaExport: string | null;
  tls: boolean;
}

/** Run the handshake. Resolves null when the client aborted or the export could not be opened. */
export async function handshake(socket: Socket, opts: HandshakeOptions): Promise<Negotiated | null> {
  const greeting = Buffer.allocUnsafe(18);
  greeting.writeBigUInt64BE(C.NBD_MAGIC, 0);
  greeting.writeBigUInt64BE(C.IHAVEOPT, 8);
  greeting.writeUInt16BE(C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES, 16);
  socket.write(greeting);

  const st: State = {
    socket, reader: new ByteReader(socket), noZeroes: false,
    structured: false, metaExport: null, tls: false,
  };
  const clientFlags = (await st.reader.read(4)).readUInt32BE(0);
  if ((clientFlags & ~C.CLIENT_FLAGS_KNOWN) !== 0) {
    throw new HandshakeError(`unknown client flags 0x${clientFlags.toString(16)}`);
  }
  st.noZeroes = (clientFlags & C.CLIENT_FLAG_NO_ZEROES) !== 0;

  for (let count = 1; ; count++) {
    const head = await st.reader.read(16);
    if (head.readBigUInt64BE(0) !== C.IHAVEOPT) throw new HandshakeError('bad option magic');
    const opt = head.readUInt32BE(8);
    const len = head.readUInt32BE(12);
    if (len > C.MAX_OPTION_LENGTH) throw new HandshakeError(`option length ${len} too large`);
    if (count > C.MAX_OPTIONS) throw new HandshakeError(`more than ${C.MAX_OPTIONS} options`);
    const data = await st.reader.read(len);
    const result = await option(st, opts, opt, data);
    if (result === 'abort') return null;
    if (result !== 'continue') return result;
  }
}

type OptionResult = 'continue' | 'abort' | Negotiated;

async function option(st: State, opts: HandshakeOptions, opt: number, data: Buffer): Promise<OptionResult> {
  const tlsBlocked = opts.tls?.require === true && !st.tls;
  if (opt === C.OPT_ABORT) {
    reply(st, opt, C.REP_ACK);
    st.socket.end();
    return 'abort';
  }
  if (opt === C.OPT_EXPORT_NAME) {
    if (tlsBlocked) throw new HandshakeError('EXPORT_NAME before STARTTLS on a TLS-only server');
    if (opts.isClosing?.()) throw new HandshakeError('server shutting down');
    return exportName(st, opts, data);
  }
  if (opt === C.OPT_STARTTLS) return startTlsOption(st, opts, data);
  if (tlsBlocked) return error(st, opt, C.REP_ERR_TLS_REQD, 'TLS is required: send STARTTLS first');
  if (opts.isClosing?.()) return error(st, opt, C.REP_ERR_SHUTDOWN, 'server shutting down');
  switch (opt) {
    case C.OPT_LIST: return list(st, opts, data);
    case C.OPT_INFO:
    case C.OPT_GO: return infoOrGo(st, opts, opt, data);
    case C.OPT_STRUCTURED_REPLY:
      if (data.length !== 0) return error(st, opt, C.REP_ERR_INVALID, 'STRUCTURED_REPLY takes no data');
      st.structured = true;
      reply(st, opt, C.REP_ACK);
      return 'continue';
    case C.OPT_LIST_META_CONTEXT:
    case C.OPT_SET_META_CONTEXT: return metaContext(st, opts, opt, data);
    case C.OPT_EXTENDED_HEADERS: return error(st, opt, C.REP_ERR_UNSUP, 'extended headers not supported');
    default: return error(st, opt, C.REP_ERR_UNSUP, `unsupported ${C.optionName(opt)}`);
  }
}

// ---------------------------------------------------------------- replies

function reply(st: State, opt: number, type: number, payload?: Buffer): void {
  const head = Buffer.allocUnsafe(20);
  head.writeBigUInt64BE(C.OPT_REPLY_MAGIC, 0);
  head.writeUInt32BE(opt, 8);
  head.writeUInt32BE(type >>> 0, 12);
  head.writeUInt32BE(payload ? payload.length : 0, 16);
  st.socket.write(payload && payload.length > 0 ? Buffer.concat([head, payload]) : head);
}

function error(st: State, opt: number, type: number, message: string): 'continue' {
  reply(st, opt, type, Buffer.from(message, 'utf8'));
  return 'continue';
}

function infoExport(info: ExportInfo, structured: boolean): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(C.INFO_EXPORT, 0);
  b.writeBigUInt64BE(BigInt(info.size), 2);
  b.writeUInt16BE(C.transmissionFlags(info.readOnly, structured), 10);
  return b;
}

function infoString(type: number, s: string): Buffer {
  const str = Buffer.from(s, 'utf8');
  const b = Buffer.allocUnsafe(2 + str.length);
  b.writeUInt16BE(type, 0);
  str.copy(b, 2);
  return b;
}

function infoBlockSize(): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(C.INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(C.BLOCK_MIN, 2);
  b.writeUInt32BE(C.BLOCK_PREF, 6);
  b.writeUInt32BE(C.BLOCK_MAX, 10);
  return b;
}

// ---------------------------------------------------------------- options

function exportName(st: State, opts: HandshakeOptions, data: Buffer): OptionResult {
  const name = data.toString('utf8');
  let handle: ExportHandle;
  try {
    handle = opts.provider.open(name, opts.peer);
  } catch (err) {
    // EXPORT_NAME cannot fail on the wire: the only refusal is to disconnect
    throw new HandshakeError(`EXPORT_NAME ${JSON.stringify(name)}: ${(err as Error).message}`);
  }
  const info = handle.info;
  const flags = C.transmissionFlags(info.readOnly, st.structured);
  const b = Buffer.alloc(st.noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(info.size), 0);
  b.writeUInt16BE(flags, 8);
  st.socket.write(b);
  return negotiated(st, handle, name, flags, 'export-name');
}

function negotiated(st: State, handle: ExportHandle, name: string, flags: number, via: Negotiated['via']): Negotiated {
  const leftover = st.reader.detach();
  return {
    socket: st.socket, leftover, handle, name, flags, via,
    structured: st.structured, baseAllocation: st.structured && st.metaExport === name, tls: st.tls,
  };
}

function list(st: State, opts: HandshakeOptions, data: Buffer): OptionResult {
  if (data.length !== 0) return error(st, C.OPT_LIST, C.REP_ERR_INVALID, 'LIST takes no data');
  for (const info of opts.provider.list()) {
    const name = Buffer.from(info.name, 'utf8');
    const desc = Buffer.from(info.description ?? '', 'utf8');
    const b = Buffer.allocUnsafe(4 + name.length + desc.length);
    b.writeUInt32BE(name.length, 0);
    name.copy(b, 4);
    desc.copy(b, 4 + name.length);
    reply(st, C.OPT_LIST, C.REP_SERVER, b);
  }
  reply(st, C.OPT_LIST, C.REP_ACK);
  return 'continue';
}

/** u32 name length, name, then the rest; null if the lengths do not add up */
function parseName(data: Buffer): { name: string; rest: Buffer } | null {
  if (data.length < 4) return null;
  const n = data.readUInt32BE(0);
  if (n > C.MAX_STRING || 4 + n > data.length) return null;
  return { name: data.toString('utf8', 4, 4 + n), rest: data.subarray(4 + n) };
}

function infoOrGo(st: State, opts: HandshakeOptions, opt: number, data: Buffer): OptionResult {
  const parsed = parseName(data);
  if (!parsed || parsed.rest.length < 2) return error(st, opt, C.REP_ERR_INVALID, 'malformed request');
  const { name, rest } = parsed;
  const nreq = rest.readUInt16BE(0);
  if (rest.length !== 2 + 2 * nreq) return error(st, opt, C.REP_ERR_INVALID, 'malformed info request list');
  const wanted = new Set<number>();
  for (let i = 0; i < nreq; i++) wanted.add(rest.readUInt16BE(2 + 2 * i));

  let handle: ExportHandle | undefined;
  let info: ExportInfo | undefined;
  if (opt === C.OPT_GO) {
    try {
      handle = opts.provider.open(name, opts.peer);
      info = handle.info;
    } catch (err) {
      return error(st, opt, C.REP_ERR_UNKNOWN, `export ${JSON.stringify(name)}: ${(err as Error).message}`);
    }
  } else {
    info = opts.provider.info(name);
    if (!info) return error(st, opt, C.REP_ERR_UNKNOWN, `no export ${JSON.stringify(name)}`);
  }
  reply(st, opt, C.REP_INFO, infoExport(info, st.structured));
  if (wanted.has(C.INFO_NAME)) reply(st, opt, C.REP_INFO, infoString(C.INFO_NAME, info.name));
  if (wanted.has(C.INFO_DESCRIPTION) && info.description) {
    reply(st, opt, C.REP_INFO, infoString(C.INFO_DESCRIPTION, info.description));
  }
  if (wanted.has(C.INFO_BLOCK_SIZE)) reply(st, opt, C.REP_INFO, infoBlockSize());
  reply(st, opt, C.REP_ACK);
  if (!handle) return 'continue';
  return negotiated(st, handle, name, C.transmissionFlags(info.readOnly, st.structured), 'go');
}

function metaContext(st: State, opts: HandshakeOptions, opt: number, data: Buffer): OptionResult {
  const set = opt === C.OPT_SET_META_CONTEXT;
  const parsed = parseName(data);
  if (!parsed || parsed.rest.length < 4) return error(st, opt, C.REP_ERR_INVALID, 'malformed request');
  const { name, rest } = parsed;
  const nq = rest.readUInt32BE(0);
  const queries: string[] = [];
  let p = 4;
  for (let i = 0; i < nq; i++) {
    if (p + 4 > rest.length) return error(st, opt, C.REP_ERR_INVALID, 'malformed query list');
    const ql = rest.readUInt32BE(p);
    if (ql > C.MAX_STRING || p + 4 + ql > rest.length) return error(st, opt, C.REP_ERR_INVALID, 'malformed query');
    queries.push(rest.toString('utf8', p + 4, p + 4 + ql));
    p += 4 + ql;
  }
  if (p !== rest.length) return error(st, opt, C.REP_ERR_INVALID, 'trailing data');
  if (set && !st.structured) return error(st, opt, C.REP_ERR_INVALID, 'SET_META_CONTEXT needs STRUCTURED_REPLY first');
  if (!opts.provider.info(name)) {
    if (set) st.metaExport = null;
    return error(st, opt, C.REP_ERR_UNKNOWN, `no export ${JSON.stringify(name)}`);
  }
  // LIST: "base:" is a wildcard and no queries lists everything; SET: exact name only
  const match = set
    ? queries.includes(C.META_BASE_ALLOCATION)
    : nq === 0 || queries.some((q) => q === C.META_BASE_ALLOCATION || q === 'base:');
  if (match) {
    const ctx = Buffer.from(C.META_BASE_ALLOCATION, 'utf8');
    const b = Buffer.allocUnsafe(4 + ctx.length);
    b.writeUInt32BE(set ? C.META_BASE_ALLOCATION_ID : 0, 0);
    ctx.copy(b, 4);
    reply(st, opt, C.REP_META_CONTEXT, b);
  }
  if (set) st.metaExport = match ? name : null;
  reply(st, opt, C.REP_ACK);
  return 'continue';
}

async function startTlsOption(st: State, opts: HandshakeOptions, data: Buffer): Promise<OptionResult> {
  const opt = C.OPT_STARTTLS;
  if (!opts.tls) return error(st, opt, C.REP_ERR_UNSUP, 'TLS not configured');
  if (st.tls) return error(st, opt, C.REP_ERR_INVALID, 'TLS already active');
  if (data.length !== 0) return error(st, opt, C.REP_ERR_INVALID, 'STARTTLS takes no data');
  reply(st, opt, C.REP_ACK);
  const rest = st.reader.detach();
  if (rest.length !== 0) throw new HandshakeError('data sent before the STARTTLS reply');
  const tsock = await startTls(st.socket, opts.tls);
  opts.onSocket?.(tsock);
  st.socket = tsock;
  st.reader = new ByteReader(tsock);
  st.tls = true;
  // everything negotiated in plaintext is forgotten
  st.structured = false;
  st.metaExport = null;
  return 'continue';
}

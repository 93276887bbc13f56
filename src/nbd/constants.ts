/**
 * NBD wire constants (fixed newstyle, structured replies, `base:allocation`) and the mapping
 * from dmkit's errno names to NBD wire errors. Values follow the NBD protocol document
 * (see docs in shared/design/NBD.md, section A). All integers on the wire are big-endian.
 */

// ---------------------------------------------------------------- magics

/** 'NBDMAGIC', first 8 bytes of the greeting */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': second 8 bytes of the greeting and the start of every client option */
export const IHAVEOPT = 0x49484156454f5054n;
/** server option reply */
export const OPT_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// ---------------------------------------------------------------- handshake flags

/** server handshake flags (u16) */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
/** client flags (u32): the same two bits; anything else drops the connection */
export const CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const CLIENT_FLAG_NO_ZEROES = 1 << 1;
export const CLIENT_FLAGS_KNOWN = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;

// ---------------------------------------------------------------- options

export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;
export const OPT_EXTENDED_HEADERS = 11;

// ---------------------------------------------------------------- option replies

export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
export const REP_ERR_UNSUP = 0x80000001;
export const REP_ERR_POLICY = 0x80000002;
export const REP_ERR_INVALID = 0x80000003;
export const REP_ERR_PLATFORM = 0x80000004;
export const REP_ERR_TLS_REQD = 0x80000005;
export const REP_ERR_UNKNOWN = 0x80000006;
export const REP_ERR_SHUTDOWN = 0x80000007;
export const REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const REP_ERR_TOO_BIG = 0x80000009;

/** NBD_INFO_* request/reply types (u16) */
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// ---------------------------------------------------------------- transmission flags (u16)

export const TFLAG_HAS_FLAGS = 1 << 0;
export const TFLAG_READ_ONLY = 1 << 1;
export const TFLAG_SEND_FLUSH = 1 << 2;
export const TFLAG_SEND_FUA = 1 << 3;
export const TFLAG_ROTATIONAL = 1 << 4;
export const TFLAG_SEND_TRIM = 1 << 5;
export const TFLAG_SEND_WRITE_ZEROES = 1 << 6;
export const TFLAG_SEND_DF = 1 << 7;
export const TFLAG_CAN_MULTI_CONN = 1 << 8;
export const TFLAG_SEND_CACHE = 1 << 10;
export const TFLAG_SEND_FAST_ZERO = 1 << 11;

/** the flags dmkit advertises for an export (READ_ONLY and SEND_DF added as applicable) */
export const TFLAGS_BASE =
  TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM |
  TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO | TFLAG_SEND_CACHE | TFLAG_CAN_MULTI_CONN;

/** transmission flags for an export; SEND_DF only when structured replies were negotiated */
export function transmissionFlags(readOnly: boolean, structured: boolean): number {
  return TFLAGS_BASE | (readOnly ? TFLAG_READ_ONLY : 0) | (structured ? TFLAG_SEND_DF : 0);
}

// ---------------------------------------------------------------- commands

export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;

export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

/** the command flags each command accepts (FUA is valid on every command) */
export function allowedCmdFlags(type: number): number {
  switch (type) {
    case CMD_READ: return CMD_FLAG_FUA | CMD_FLAG_DF;
    case CMD_WRITE_ZEROES: return CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO;
    case CMD_BLOCK_STATUS: return CMD_FLAG_FUA | CMD_FLAG_REQ_ONE;
    default: return CMD_FLAG_FUA;
  }
}

// ---------------------------------------------------------------- structured reply chunks

export const REPLY_FLAG_DONE = 1 << 0;
export const CHUNK_NONE = 0;
export const CHUNK_OFFSET_DATA = 1;
export const CHUNK_OFFSET_HOLE = 2;
export const CHUNK_BLOCK_STATUS = 5;
export const CHUNK_ERROR = 0x8001;
export const CHUNK_ERROR_OFFSET = 0x8002;

/** `base:allocation` extent flags */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

/** the only meta context dmkit serves, and the id it is given after SET_META_CONTEXT */
export const META_BASE_ALLOCATION = 'base:allocation';
export const META_BASE_ALLOCATION_ID = 1;

// ---------------------------------------------------------------- sizes and limits

export const REQUEST_HEADER_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const CHUNK_HEADER_SIZE = 20;
/** advertised block sizes: minimum, preferred, maximum payload */
export const BLOCK_MIN = 512;
export const BLOCK_PREF = 4096;
export const BLOCK_MAX = 32 * 1024 * 1024;
/** reads are served in pieces of at most this size (page-cache reads slow down above it) */
export const READ_PIECE = 256 * 1024;
/** option data above this drops the connection */
export const MAX_OPTION_LENGTH = 64 * 1024;
/** options per connection before it is dropped (as nbdkit) */
export const MAX_OPTIONS = 32;
/** longest export name / string accepted */
export const MAX_STRING = 4096;

// ---------------------------------------------------------------- errors

/** NBD wire errno values */
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

const ERRNO_TO_WIRE: Readonly<Record<string, number>> = {
  EPERM: NBD_EPERM,
  EROFS: NBD_EPERM,
  EACCES: NBD_EPERM,
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC,
  EDQUOT: NBD_ENOSPC,
  EFBIG: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  EOPNOTSUPP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
};

/** errno name (from a BlockError/DmError/Node error `code`) → NBD wire errno; unknown → EIO */
export function wireErrno(code: unknown): number {
  if (typeof code !== 'string') return NBD_EIO;
  return ERRNO_TO_WIRE[code] ?? NBD_EIO;
}

/** the wire errno for anything a handle rejected with */
export function errorToWire(err: unknown): number {
  return wireErrno((err as { code?: unknown } | null | undefined)?.code);
}

/** a short message for an error the server raised itself (sent in structured error chunks) */
export function errnoMessage(errno: number): string {
  switch (errno) {
    case NBD_EPERM: return 'export is read-only';
    case NBD_EINVAL: return 'invalid request';
    case NBD_ENOSPC: return 'request beyond the end of the export';
    case NBD_EOVERFLOW: return 'request too large';
    case NBD_ENOTSUP: return 'fast zero not supported';
    case NBD_ESHUTDOWN: return 'export is shutting down';
    default: return 'request failed';
  }
}

/** name of an option, for logs */
export function optionName(opt: number): string {
  switch (opt) {
    case OPT_EXPORT_NAME: return 'EXPORT_NAME';
    case OPT_ABORT: return 'ABORT';
    case OPT_LIST: return 'LIST';
    case OPT_STARTTLS: return 'STARTTLS';
    case OPT_INFO: return 'INFO';
    case OPT_GO: return 'GO';
    case OPT_STRUCTURED_REPLY: return 'STRUCTURED_REPLY';
    case OPT_LIST_META_CONTEXT: return 'LIST_META_CONTEXT';
    case OPT_SET_META_CONTEXT: return 'SET_META_CONTEXT';
    case OPT_EXTENDED_HEADERS: return 'EXTENDED_HEADERS';
    default: return `option ${opt}`;
  }
}

/**
 * The control protocol: newline-delimited JSON over a Unix socket.
 *
 *   request  {"id": 1, "op": "create", "args": {...}}
 *   reply    {"id": 1, "ok": true, "result": ...}
 *            {"id": 1, "ok": false, "error": {"code": "EBUSY", "message": "..."}}
 *   stream   {"id": 1, "ok": true, "stream": ...}      zero or more, then one final reply
 *            {"id": 1, "ok": true, "done": true, "result": ...}
 *
 * Requests on one connection run concurrently; replies carry the request's id. A reply
 * without `stream` is final. `cancel {id}` ends a running long request (wait, watch,
 * progress, events) with an ECANCELED error; closing the connection cancels all of its requests.
 * A malformed line gets an error reply with id null and the connection stays usable.
 */
import { DmError } from '../core/errors.ts';
import type { DeviceInfo, TableLineOut } from '../core/device-manager.ts';
import type { IoStatsSnapshot } from '../core/io-stats.ts';

export const PROTOCOL_VERSION = 1;
/** longest request line the daemon accepts (io writes carry base64 data) */
export const MAX_LINE = 64 * 1024 * 1024;
/** largest io request in bytes */
export const MAX_IO = 16 * 1024 * 1024;

export type RequestId = number | string;

export interface Request {
  id: RequestId;
  op: string;
  args?: Record<string, unknown>;
}

export interface WireError {
  code: string;
  message: string;
}

export type Reply =
  | { id: RequestId | null; ok: true; result: unknown; done?: true }
  | { id: RequestId; ok: true; stream: unknown }
  | { id: RequestId | null; ok: false; error: WireError };

/** A device as `list` returns it: its info plus what `ls --tree` and `ls --target` need. */
export interface DeviceSummary extends DeviceInfo {
  /** references the live table uses */
  deps: string[];
  /** target types of the live table, in table order */
  types: string[];
  /** replicator / replicator-dev: the live target's status with names (its `statusJson`) */
  replication?: unknown;
  /** background work (resync, verify) while it runs */
  progress?: ProgressItem;
  /** I/O statistics since the device was created (src/core/io-stats.ts) */
  io: IoStatsSnapshot;
}

export interface HelloResult {
  protocol: number;
  version: string;
  pid: number;
  runtimeDir: string;
  stateDir: string;
  /** devices whose table could not be restored at start */
  restoreErrors: Array<{ name: string; error: string }>;
  /** the NBD export's TCP address, when it listens on TCP */
  nbdTcp: { host: string; port: number } | null;
  /** where the replication receiver listens (`--replication-listen`), null when it does not */
  replicationTcp: { host: string; port: number } | null;
  /** where the HTTP listener (`--http-listen`) listens, or null */
  httpTcp?: { host: string; port: number } | null;
}

export interface TablesResult {
  lines: TableLineOut[];
  /** `status` only: the device's background work while it runs */
  progress?: ProgressItem;
}

/** background work of a device (dm.progress), streamed by `progress` */
export interface ProgressItem {
  name: string;
  /** what runs, e.g. 'resync' */
  work: string;
  doneSectors: number;
  totalSectors: number;
  /** the rest as `ProgressReport` (src/core/types.ts): never backwards within a run */
  percent: number;
  /** bytes per second, measured over the last seconds (0 until measured) */
  rate: number;
  /** seconds left at that rate; null while the rate is 0 */
  eta: number | null;
}

export type WatchItem = { type: 'change' } | { type: 'event'; name: string; eventNr: number };

export function encode(msg: Reply | Request): string {
  return `${JSON.stringify(msg)}\n`;
}

/** Splits a text stream into lines; refuses lines longer than `max`. Linear in the input. */
export class LineDecoder {
  #parts: string[] = [];
  #pending = 0;
  readonly #max: number;

  constructor(max = MAX_LINE) {
    this.#max = max;
  }

  /** feed a chunk; returns the complete lines (without the newline) */
  push(chunk: string): string[] {
    const lines: string[] = [];
    let from = 0;
    let nl: number;
    while ((nl = chunk.indexOf('\n', from)) >= 0) {
      this.#parts.push(chunk.slice(from, nl));
      lines.push(this.#parts.join(''));
      this.#parts = [];
      this.#pending = 0;
      from = nl + 1;
    }
    if (from < chunk.length) {
      this.#parts.push(chunk.slice(from));
      this.#pending += chunk.length - from;
    }
    if (this.#pending > this.#max) {
      this.#parts = [];
      this.#pending = 0;
      throw new DmError('E2BIG', `request line longer than ${this.#max} bytes`);
    }
    return lines;
  }
}

/** Parse one request line; throws DmError(EBADMSG) with the id when one is readable. */
export function parseRequest(line: string): Request {
  let msg: unknown;
  try {
    msg = JSON.parse(line);
  } catch (err) {
    throw new ProtocolError(null, 'EBADMSG', `malformed JSON request: ${(err as Error).message}`);
  }
  if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) {
    throw new ProtocolError(null, 'EBADMSG', 'a request must be a JSON object {id, op, args}');
  }
  const { id, op, args } = msg as Record<string, unknown>;
  const okId = typeof id === 'number' || typeof id === 'string';
  if (!okId) throw new ProtocolError(null, 'EBADMSG', 'request without an id (a number or a string)');
  if (typeof op !== 'string' || op === '') throw new ProtocolError(id, 'EBADMSG', 'request without an op');
  if (args !== undefined && (typeof args !== 'object' || args === null || Array.isArray(args))) {
    throw new ProtocolError(id, 'EBADMSG', `${op}: args must be an object`);
  }
  return { id, op, args: (args ?? {}) as Record<string, unknown> };
}

/** A request the protocol layer refuses, with the id to reply to (null when unknown). */
export class ProtocolError extends DmError {
  readonly id: RequestId | null;
  constructor(id: RequestId | null, code: string, message: string) {
    super(code, message);
    this.id = id;
  }
}

/** Any thrown value → the error object sent on the wire. Unknown codes become EIO. */
export function toWireError(err: unknown): WireError {
  const code = (err as { code?: unknown })?.code;
  const message = err instanceof Error ? err.message : String(err);
  return { code: typeof code === 'string' && /^E[A-Z0-9]+$/.test(code) ? code : 'EIO', message };
}

// ---- argument readers for op handlers: each names the op and the argument it refuses ----

export class Args {
  readonly #op: string;
  readonly #args: Record<string, unknown>;

  constructor(op: string, args: Record<string, unknown>) {
    this.#op = op;
    this.#args = args;
  }

  #bad(key: string, want: string): never {
    throw new DmError('EINVAL', `${this.#op}: argument '${key}' must be ${want} (got ${JSON.stringify(this.#args[key]) ?? 'nothing'})`);
  }

  str(key: string): string {
    const v = this.#args[key];
    if (typeof v !== 'string' || v === '') this.#bad(key, 'a non-empty string');
    return v;
  }

  optStr(key: string): string | undefined {
    return this.#args[key] === undefined ? undefined : this.str(key);
  }

  /** a string that may be empty (table text) */
  text(key: string): string {
    const v = this.#args[key];
    if (typeof v !== 'string') this.#bad(key, 'a string');
    return v;
  }

  optText(key: string): string | undefined {
    return this.#args[key] === undefined ? undefined : this.text(key);
  }

  bool(key: string): boolean {
    const v = this.#args[key];
    if (v === undefined) return false;
    if (typeof v !== 'boolean') this.#bad(key, 'true or false');
    return v;
  }

  uint(key: string): number {
    const v = this.#args[key];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) this.#bad(key, 'a non-negative integer');
    return v;
  }

  optUint(key: string): number | undefined {
    return this.#args[key] === undefined ? undefined : this.uint(key);
  }

  strings(key: string): string[] {
    const v = this.#args[key];
    if (!Array.isArray(v) || v.some((x) => typeof x !== 'string')) this.#bad(key, 'an array of strings');
    return v as string[];
  }

  oneOf<T extends string>(key: string, values: readonly T[]): T {
    const v = this.#args[key];
    if (typeof v !== 'string' || !values.includes(v as T)) this.#bad(key, `one of ${values.join(', ')}`);
    return v as T;
  }
}

/**
 * `nbd` slink: each site device is an export of an NBD server at the site (dmkit's own,
 * nbdkit, qemu-nbd, …), reached over its own NbdClient (not through the engine's device
 * references), so the slink decides what a lost server means.
 *
 *   replicator:      nbd <#params> <slink#> [<policy> [<fallbehind>]] [retest=<seconds>] [io-timeout=<seconds>]
 *   replicator-dev:  <slink#> 1 <nbd-uri> <dlog_type> …
 *
 * `<nbd-uri>` is nbd://, nbds://, nbd+unix:// or nbds+unix:// (client-uri.ts). `io-timeout`
 * (default 30 s) drops a connection whose requests get no answer for that long; a connect
 * (handshake included) waits at most 3 s or `io-timeout`, whichever is shorter.
 *
 * A site that does not answer is a site down, never a table error: `attach` connects once,
 * and when the server cannot be reached (refused, no socket, reset, timed out) the device
 * attaches `down`: its I/O fails at once with ENXIO, so the replicator marks the site down
 * and calls `test()` every `retest` seconds, which connects again. Only what the table
 * itself gets wrong fails the attach: a word that is not an NBD URI, an export the server
 * says it does not have, a server that is not NBD or wants TLS, an export smaller than the
 * replicator-dev ("device too small" — also what `test()` rejects with if it shrank).
 *
 * A lost connection is retried by the client for RECONNECT_MS, requests waiting (and then
 * re-sent); past that they fail with EIO, the client is down, and further I/O fails at once
 * until `test()` has connected again. I/O maps as the engine's NBD devices do (NbdDev):
 * write `fua` → NBD_CMD_FLAG_FUA, flush → NBD_CMD_FLUSH, discard → TRIM, write-zeroes →
 * WRITE_ZEROES (commands the server lacks are emulated as NbdClient says). The shipper
 * keeps the order (epochs one after the other) and sends flushes at flush entries and
 * before it checkpoints the site's position; the ShipTag is not needed here.
 *
 * status info: the aggregate connection state (`connected` only if every device is;
 * `down` if any is; else `connecting`) and each device's as `<dev_nr>:<state>`; empty
 * while no device is attached. `--json` (`link`): the same with each device's URI and why
 * it is not connected.
 */
import type { Bio } from '../core/bio.ts';
import { BlockError, DmError, TargetArgError, toBlockError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { escapeArg } from '../core/table-parse.ts';
import type { StatusType } from '../core/types.ts';
import { NbdClient, type NbdClientOptions } from '../nbd/client.ts';
import { isNbdUri, parseNbdUri, type NbdUri } from '../nbd/client-uri.ts';
import { NbdDev } from '../nbd/resolver.ts';
import { optionsTable, readDeviceParam, testDevice, tooSmall } from './common.ts';
import { readOptions, readRetest, readSeconds } from './options.ts';
import type { RemoteDevice, SiteLink, SiteLinkType, SlinkContext, SlinkDeviceContext } from './types.ts';

const KNOWN_OPTIONS = ['retest', 'io-timeout'] as const;
/** how long a client retries a lost connection before its requests fail (the site goes down) */
export const RECONNECT_MS = 3000;
/** the longest one connect and handshake may take (attach, test) */
export const CONNECT_MS = 3000;
/** `io-timeout=` when the table gives none: no answer for this long drops the connection */
export const DEFAULT_TIMEOUT_MS = 30_000;

/** a device's connection: `connecting` covers the client's own reconnect attempts */
export type NbdLinkState = 'connected' | 'connecting' | 'down';

/** the socket's own errors and the handshake's timeout: nobody answered (as opposed to a refusal) */
const UNREACHABLE: ReadonlySet<string> = new Set([
  'ECONNREFUSED', 'ECONNRESET', 'ECONNABORTED', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH',
  'EHOSTDOWN', 'ENETDOWN', 'EPIPE', 'ESHUTDOWN', 'EAI_AGAIN', 'ENOTFOUND',
]);

/**
 * Could the server not be reached (the site is down) — rather than answering with a refusal
 * (no such export, TLS required, not an NBD server)? A Node system error anywhere in the
 * cause chain (connect, getaddrinfo, read) or a connection-level code says so.
 */
function unreachable(err: unknown): boolean {
  type Link = { code?: unknown; syscall?: unknown; cause?: unknown } | undefined;
  let e = err as Link;
  for (let depth = 0; e && depth < 8; depth++) {
    if (typeof e.syscall === 'string') return true;
    if (typeof e.code === 'string' && UNREACHABLE.has(e.code)) return true;
    e = e.cause as Link;
  }
  return false;
}

/** why a connect failed: the server was not reached, refused the export, or the export is too small */
class ConnectError extends DmError {
  readonly kind: 'unreachable' | 'refused' | 'small';
  constructor(kind: ConnectError['kind'], code: string, message: string, cause?: unknown) {
    super(code, message, cause === undefined ? undefined : { cause });
    this.kind = kind;
  }
}

/** One site device: an NbdDev over a client of its own, or nothing while the server is down. */
class NbdRemote implements RemoteDevice {
  readonly devNr: number;
  readonly ref: string;
  readonly #uri: NbdUri;
  readonly #slink: number;
  readonly #length: number;
  readonly #opts: NbdClientOptions;
  readonly #gone: (r: NbdRemote) => void;
  #dev: NbdDev | null = null;
  /** why it is not connected, for its errors */
  #why = 'not connected yet';
  #connecting: Promise<void> | null = null;
  #detached = false;

  constructor(uri: NbdUri, slink: number, devNr: number, length: number, opts: NbdClientOptions, gone: (r: NbdRemote) => void) {
    this.#uri = uri;
    this.ref = uri.uri;
    this.#slink = slink;
    this.devNr = devNr;
    this.#length = length;
    this.#opts = opts;
    this.#gone = gone;
  }

  /** the export's size in sectors; the replicator-dev's length while it was never reached */
  get sectors(): number {
    return this.#dev?.sectors ?? this.#length;
  }

  /** why it is not connected (the last connect's failure, or the lost connection); null while it is */
  get error(): string | null {
    return this.state === 'connected' ? null : this.#why;
  }

  get state(): NbdLinkState {
    if (this.#connecting) return 'connecting';
    const s = this.#dev?.client.state;
    return s === 'connected' ? 'connected' : s === 'reconnecting' ? 'connecting' : 'down';
  }

  /** I/O through the client; at once ENXIO while no client is connected or reconnecting */
  submit(bio: Bio): Promise<void> {
    if (this.#detached) return Promise.reject(new BlockError('ESHUTDOWN', `${this.ref}: slink device detached`));
    const dev = this.#dev;
    const s = dev?.client.state;
    if (!dev || (s !== 'connected' && s !== 'reconnecting')) {
      if (dev) this.#why = `connection lost and not re-established within ${RECONNECT_MS} ms`;
      return Promise.reject(new BlockError('ENXIO', `slink ${this.#slink}: ${this.ref}: not connected (${this.#why})`));
    }
    return dev.submit(bio);
  }

  /** connect again if the client is down (the export must still hold the device), then a flush and a read of sector 0 */
  async test(): Promise<void> {
    if (this.#detached) throw new BlockError('ESHUTDOWN', `${this.ref}: slink device detached`);
    const s = this.#dev?.client.state;
    if (s !== 'connected' && s !== 'reconnecting') {
      try {
        await this.connect();
      } catch (err) {
        const e = err as ConnectError;
        if (e.kind === 'small') throw new BlockError('ENOSPC', e.message);
        if (e.kind === 'unreachable') throw new BlockError('ENXIO', e.message, { cause: err });
        throw toBlockError(err);
      }
    }
    await testDevice((bio) => this.submit(bio));
  }

  /** one connect at a time; rejects with a ConnectError */
  connect(): Promise<void> {
    this.#connecting ??= this.#connect().finally(() => (this.#connecting = null));
    return this.#connecting;
  }

  async #connect(): Promise<void> {
    let client: NbdClient;
    try {
      client = await NbdClient.connect(this.#uri, this.#opts);
    } catch (err) {
      const text = (err as Error).message;
      const msg = `slink ${this.#slink}: ${text}`;
      this.#why = text.startsWith(`${this.ref}: `) ? text.slice(this.ref.length + 2) : text;
      const code = (err as { code?: string }).code ?? 'EIO';
      throw new ConnectError(unreachable(err) ? 'unreachable' : 'refused', code, msg, err);
    }
    const dev = new NbdDev(this.ref, client);
    const small = this.#detached ? null : tooSmall(this.#slink, this.ref, dev.sectors, this.#length);
    if (this.#detached || small) {
      await client.close().catch(() => {});
      if (small) this.#why = `export too small (${dev.sectors} sectors, needs ${this.#length})`;
      throw small ? new ConnectError('small', 'EINVAL', small) : new ConnectError('refused', 'ESHUTDOWN', `${this.ref}: slink device detached`);
    }
    const old = this.#dev;
    this.#dev = dev;
    if (old) await old.close().catch(() => {});
  }

  params(): string[] {
    return [escapeArg(this.ref)];
  }

  /** close the client (after a connect in progress settles); never rejects */
  async detach(): Promise<void> {
    if (this.#detached) return;
    this.#detached = true;
    this.#gone(this);
    await this.#connecting?.catch(() => {});
    const dev = this.#dev;
    this.#dev = null;
    await dev?.close().catch(() => {});
  }
}

class NbdSlink implements SiteLink {
  readonly type = 'nbd';
  readonly slink: number;
  readonly retestMs: number;
  readonly #options: readonly string[];
  readonly #clientOpts: NbdClientOptions;
  readonly #log: Logger;
  readonly #remotes = new Set<NbdRemote>();

  constructor(ctx: SlinkContext, slink: number, retestMs: number, timeoutMs: number, options: readonly string[]) {
    this.slink = slink;
    this.retestMs = retestMs;
    this.#options = options;
    this.#log = ctx.log;
    this.#clientOpts = {
      reconnectTimeoutMs: RECONNECT_MS,
      connectTimeoutMs: Math.min(CONNECT_MS, timeoutMs),
      ioTimeoutMs: timeoutMs,
      blockStatus: false,
    };
  }

  /** the URI must parse; the export must be big enough if the server answers; a server that does not answer attaches down */
  async attach(ctx: SlinkDeviceContext, devNr: number, params: readonly string[]): Promise<RemoteDevice> {
    const uri = readUri(this.slink, readDeviceParam(this.slink, 'nbd', '<nbd-uri>', params));
    const remote = new NbdRemote(uri, this.slink, devNr, ctx.length, this.#clientOpts, (r) => this.#remotes.delete(r));
    try {
      await remote.connect();
    } catch (err) {
      const e = err as ConnectError;
      if (e.kind !== 'unreachable') throw new TargetArgError(e.message, e.kind === 'small' ? 'EINVAL' : e.code);
      this.#log.warn(`${e.message}: ${ctx.device} attached with its site down (retested every ${this.retestMs / 1000} s once I/O fails)`);
    }
    this.#remotes.add(remote);
    return remote;
  }

  options(): string[] {
    return [...this.#options];
  }

  /** info: the connection state (see the file comment); table: the options */
  status(type: StatusType): string {
    if (type !== 'info') return optionsTable(this.#options);
    const { state, devices } = this.#states();
    return state === null ? '' : [state, ...devices.map((d) => `${d.devNr}:${d.state}`)].join(' ');
  }

  /** `--json`: `{state, devices: [{devNr, uri, state, error}]}`; undefined while no device is attached */
  statusJson(): Record<string, unknown> | undefined {
    const { state, devices } = this.#states();
    return state === null ? undefined : { state, devices };
  }

  #states(): { state: NbdLinkState | null; devices: Array<{ devNr: number; uri: string; state: NbdLinkState; error: string | null }> } {
    const devices = [...this.#remotes].sort((a, b) => a.devNr - b.devNr)
      .map((r) => ({ devNr: r.devNr, uri: r.ref, state: r.state, error: r.error }));
    if (devices.length === 0) return { state: null, devices };
    const states = devices.map((d) => d.state);
    const state = states.every((s) => s === 'connected') ? 'connected' : states.includes('down') ? 'down' : 'connecting';
    return { state, devices };
  }

  /** close every client still open; never rejects */
  async destroy(): Promise<void> {
    await Promise.all([...this.#remotes].map((r) => r.detach()));
  }
}

/** `<nbd-uri>`: an NBD URI that parses, else TargetArgError naming the slink and what was expected */
function readUri(slink: number, word: string): NbdUri {
  if (!isNbdUri(word)) {
    throw new TargetArgError(`slink ${slink}: nbd device '${word}' is not an NBD URI (expected nbd://, nbds://, nbd+unix:// or nbds+unix://)`);
  }
  try {
    return parseNbdUri(word);
  } catch (err) {
    throw new TargetArgError(`slink ${slink}: ${(err as Error).message}`);
  }
}

/** The `nbd` transport. Options: `retest=<seconds>` (default 15), `io-timeout=<seconds>` (default 30). */
export const nbdSlink: SiteLinkType = {
  name: 'nbd',
  create(ctx: SlinkContext, slink: number, options: readonly string[]): SiteLink {
    const opts = readOptions(slink, 'nbd', options, KNOWN_OPTIONS);
    const retestMs = readRetest(slink, opts.get('retest'));
    const timeoutMs = readSeconds(slink, 'io-timeout', opts.get('io-timeout'), DEFAULT_TIMEOUT_MS);
    return new NbdSlink(ctx, slink, retestMs, timeoutMs, [...options]);
  },
};

/**
 * NBD URIs (the NBD URI spec, as libnbd and nbdinfo read them):
 *
 *   nbd://host[:port]/export            plain TCP (port 10809 by default)
 *   nbds://[user@]host[:port]/export    TCP, TLS mandatory
 *   nbd+unix:///export?socket=PATH      Unix socket
 *   nbds+unix://[user@]/export?socket=PATH&tls-psk-file=FILE
 *
 * The export name is the path minus its leading `/`, percent-decoded: `nbd://h` and
 * `nbd://h/` name the default export `""`, `nbd://h//disk` names `/disk`. Query keys:
 * `socket` (Unix forms only) and `tls-psk-file` (TLS forms only); the identity for PSK is
 * the URI's user (default: the local user name, as libnbd). Anything else is refused with a
 * message that says what was expected, so a typo in a table never silently connects
 * somewhere else.
 */
import { DmError } from '../core/errors.ts';

export const NBD_DEFAULT_PORT = 10809;
/** longest export name the protocol allows (bytes of UTF-8) */
const MAX_EXPORT_NAME = 4096;

export type NbdEndpoint =
  | { readonly kind: 'tcp'; readonly host: string; readonly port: number }
  | { readonly kind: 'unix'; readonly path: string };

export interface NbdUri {
  /** the URI exactly as given */
  readonly uri: string;
  readonly scheme: 'nbd' | 'nbds' | 'nbd+unix' | 'nbds+unix';
  readonly endpoint: NbdEndpoint;
  readonly exportName: string;
  /** TLS is mandatory (nbds schemes) */
  readonly tls: boolean;
  /** TLS PSK identity from the user part, if given */
  readonly user?: string;
  /** nbdkit-style `identity:hexkey` file (`tls-psk-file=`) */
  readonly pskFile?: string;
}

const SCHEMES: ReadonlySet<string> = new Set(['nbd', 'nbds', 'nbd+unix', 'nbds+unix']);
const URI_RE = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?(#.*)?$/;

/** does `ref` look like an NBD URI (any of the four schemes)? */
export function isNbdUri(ref: string): boolean {
  const m = /^([A-Za-z][A-Za-z0-9+.-]*):/.exec(ref);
  return !!m && SCHEMES.has(m[1]!.toLowerCase());
}

function fail(uri: string, detail: string): never {
  throw new DmError('EINVAL', `invalid NBD URI '${uri}': ${detail}`);
}

function decode(uri: string, s: string, what: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return fail(uri, `bad percent-encoding in ${what}`);
  }
}

/** Parse an NBD URI; throws DmError EINVAL naming the URI and the problem. */
export function parseNbdUri(uri: string): NbdUri {
  const m = URI_RE.exec(uri);
  if (!m) {
    if (isNbdUri(uri)) fail(uri, "expected '//' after the scheme (e.g. nbd://host/export or nbd+unix:///export?socket=PATH)");
    return fail(uri, 'not a URI (expected nbd://, nbds://, nbd+unix:// or nbds+unix://)');
  }
  const scheme = m[1]!.toLowerCase();
  if (!SCHEMES.has(scheme)) {
    if (scheme.startsWith('nbd')) fail(uri, `unsupported scheme '${scheme}' (supported: nbd, nbds, nbd+unix, nbds+unix)`);
    fail(uri, `not an NBD scheme '${scheme}'`);
  }
  const authority = m[2]!;
  const path = m[3]!;
  const query = m[4];
  if (m[5] !== undefined) fail(uri, 'fragments (#…) are not allowed');
  const unix = scheme.endsWith('+unix');
  const tls = scheme.startsWith('nbds');

  const at = authority.lastIndexOf('@');
  const userinfo = at >= 0 ? authority.slice(0, at) : undefined;
  const hostport = at >= 0 ? authority.slice(at + 1) : authority;
  let user: string | undefined;
  if (userinfo !== undefined) {
    if (userinfo.includes(':')) fail(uri, 'passwords in the URI are not supported (use tls-psk-file)');
    if (userinfo === '') fail(uri, "empty user name before '@'");
    user = decode(uri, userinfo, 'user name');
    if (!tls) fail(uri, `a user name is only meaningful with TLS (use ${unix ? 'nbds+unix' : 'nbds'}://)`);
  }

  const params = parseQuery(uri, query);
  for (const key of params.keys()) {
    if (key === 'socket') {
      if (!unix) fail(uri, `'socket=' is only valid with nbd+unix:// or nbds+unix://`);
    } else if (key === 'tls-psk-file') {
      if (!tls) fail(uri, `'tls-psk-file=' needs TLS (use ${unix ? 'nbds+unix' : 'nbds'}://)`);
    } else if (key.startsWith('tls-')) {
      fail(uri, `query parameter '${key}' is not supported (only TLS-PSK: tls-psk-file=FILE)`);
    } else {
      const allowed = [unix ? 'socket' : '', tls ? 'tls-psk-file' : ''].filter(Boolean).join(', ');
      fail(uri, `unknown query parameter '${key}' (${allowed ? `expected ${allowed}` : `${scheme}:// takes no query parameters`})`);
    }
  }

  let endpoint: NbdEndpoint;
  if (unix) {
    if (hostport !== '') fail(uri, `a Unix-socket URI has no host ('${hostport}'); write ${scheme}:///export?socket=PATH`);
    const socket = params.get('socket');
    if (socket === undefined || socket === '') fail(uri, "missing '?socket=PATH' (the Unix socket to connect to)");
    endpoint = { kind: 'unix', path: socket };
  } else {
    endpoint = parseHostPort(uri, hostport);
  }

  if (path !== '' && !path.startsWith('/')) fail(uri, 'the export path must start with /');
  const exportName = decode(uri, path.slice(1), 'export name');
  if (Buffer.byteLength(exportName) > MAX_EXPORT_NAME) fail(uri, `export name longer than ${MAX_EXPORT_NAME} bytes`);
  if (exportName.includes('\0')) fail(uri, 'export name contains NUL');

  const out: { -readonly [K in keyof NbdUri]: NbdUri[K] } = {
    uri, scheme: scheme as NbdUri['scheme'], endpoint, exportName, tls,
  };
  if (user !== undefined) out.user = user;
  const psk = params.get('tls-psk-file');
  if (psk !== undefined) {
    if (psk === '') fail(uri, "empty 'tls-psk-file='");
    out.pskFile = psk;
  }
  return out;
}

function parseQuery(uri: string, query: string | undefined): Map<string, string> {
  const params = new Map<string, string>();
  if (query === undefined || query === '') return params;
  for (const part of query.split('&')) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    const key = decode(uri, eq >= 0 ? part.slice(0, eq) : part, 'query');
    if (eq < 0) fail(uri, `query parameter '${key}' has no value (expected ${key}=VALUE)`);
    if (params.has(key)) fail(uri, `query parameter '${key}' given twice`);
    params.set(key, decode(uri, part.slice(eq + 1), `query parameter '${key}'`));
  }
  return params;
}

function parseHostPort(uri: string, hostport: string): NbdEndpoint {
  let host: string;
  let portText: string | undefined;
  if (hostport.startsWith('[')) {
    const close = hostport.indexOf(']');
    if (close < 0) fail(uri, "unterminated '[' in IPv6 host");
    host = hostport.slice(1, close);
    const rest = hostport.slice(close + 1);
    if (rest !== '' && !rest.startsWith(':')) fail(uri, `unexpected '${rest}' after IPv6 host`);
    if (rest !== '') portText = rest.slice(1);
    if (!/^[0-9A-Fa-f:.]+(%.+)?$/.test(host)) fail(uri, `invalid IPv6 address '${host}'`);
  } else {
    const colon = hostport.lastIndexOf(':');
    host = colon >= 0 ? hostport.slice(0, colon) : hostport;
    if (colon >= 0) portText = hostport.slice(colon + 1);
    host = decode(uri, host, 'host');
    if (host.includes(':')) fail(uri, 'IPv6 addresses must be in brackets, e.g. nbd://[::1]/export');
  }
  if (host === '') fail(uri, 'missing host (e.g. nbd://localhost/export; Unix sockets use nbd+unix:///export?socket=PATH)');
  let port = NBD_DEFAULT_PORT;
  if (portText !== undefined && portText !== '') {
    if (!/^\d{1,5}$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535) {
      fail(uri, `invalid port '${portText}' (1–65535)`);
    }
    port = Number(portText);
  }
  return { kind: 'tcp', host, port };
}

/** the endpoint for messages: `host:port` or the socket path */
export function describeEndpoint(e: NbdEndpoint): string {
  if (e.kind === 'unix') return e.path;
  return e.host.includes(':') ? `[${e.host}]:${e.port}` : `${e.host}:${e.port}`;
}

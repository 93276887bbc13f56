/**
 * STARTTLS with pre-shared keys. Keys come from an nbdkit/GnuTLS-style PSK file: one
 * `identity:hexkey` per line (blank lines and `#` comments ignored). The TLS session is run
 * by Node's TLSSocket over the already-connected socket; the PSK cipher suites are TLS 1.2
 * (OpenSSL also serves TLS 1.3 with the SHA-256 suites through the same callback).
 */
import { readFileSync } from 'node:fs';
import type { Socket } from 'node:net';
import { TLSSocket, createSecureContext, type SecureContext, type TLSSocketOptions, type TlsOptions } from 'node:tls';
import { DmError } from '../core/errors.ts';

/** TLS 1.2 PSK suites first, then ECDHE/DHE-PSK; TLS 1.3 suites are configured separately */
const PSK_CIPHERS = [
  'PSK-AES256-GCM-SHA384', 'PSK-AES128-GCM-SHA256',
  'ECDHE-PSK-AES256-CBC-SHA384', 'ECDHE-PSK-AES128-CBC-SHA256',
  'DHE-PSK-AES256-GCM-SHA384', 'DHE-PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305', 'ECDHE-PSK-CHACHA20-POLY1305',
  'TLS_AES_128_GCM_SHA256', 'TLS_CHACHA20_POLY1305_SHA256',
].join(':');

export interface TlsServerConfig {
  /** identity → key */
  readonly keys: ReadonlyMap<string, Buffer>;
  readonly context: SecureContext;
  /** FORCEDTLS: every option but STARTTLS/ABORT is refused until TLS is up */
  readonly require: boolean;
}

/** parse an nbdkit-style PSK file; throws DmError EINVAL naming the line on malformed input */
export function parsePskFile(text: string, source = 'psk file'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === '' || line.startsWith('#')) continue;
    const colon = line.lastIndexOf(':');
    const identity = colon > 0 ? line.slice(0, colon) : '';
    const hex = colon > 0 ? line.slice(colon + 1) : '';
    if (identity === '' || hex === '' || hex.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(hex)) {
      throw new DmError('EINVAL', `${source}: line ${i + 1}: expected identity:hexkey`);
    }
    keys.set(identity, Buffer.from(hex, 'hex'));
  }
  if (keys.size === 0) throw new DmError('EINVAL', `${source}: no keys`);
  return keys;
}

export function loadTlsConfig(opts: { pskFile: string; require: boolean }): TlsServerConfig {
  let text: string;
  try {
    text = readFileSync(opts.pskFile, 'utf8');
  } catch (err) {
    throw new DmError('EINVAL', `cannot read PSK file ${opts.pskFile}: ${(err as Error).message}`, { cause: err });
  }
  return pskServerConfig(parsePskFile(text, opts.pskFile), opts.require);
}

/** a server's TLS-PSK configuration from its keys (identity → key) */
export function pskServerConfig(keys: ReadonlyMap<string, Buffer>, require: boolean): TlsServerConfig {
  const context = createSecureContext({
    ciphers: PSK_CIPHERS,
    minVersion: 'TLSv1.2',
  });
  return { keys, context, require };
}

/**
 * Run the server side of a TLS handshake on `socket` (which must be paused, with no data
 * listeners and no unread bytes). Resolves with the TLS socket once the session is up;
 * rejects if the handshake fails or the peer goes away.
 */
export function startTls(socket: Socket, cfg: TlsServerConfig): Promise<TLSSocket> {
  // pskCallback is honoured by TLSSocket's server side but missing from TLSSocketOptions' type
  const options: TLSSocketOptions & Pick<TlsOptions, 'pskCallback'> = {
    isServer: true,
    secureContext: cfg.context,
    requestCert: false,
    pskCallback: (_sock, identity) => cfg.keys.get(identity) ?? null,
  };
  const tsock = new TLSSocket(socket, options);
  return new Promise<TLSSocket>((resolve, reject) => {
    const cleanup = (): void => {
      tsock.off('secure', onSecure);
      tsock.off('error', onError);
      tsock.off('close', onClose);
    };
    const onSecure = (): void => {
      cleanup();
      resolve(tsock);
    };
    const onError = (err: Error): void => {
      cleanup();
      tsock.on('error', () => {});
      tsock.destroy();
      reject(new DmError('EPERM', `TLS handshake failed: ${err.message}`, { cause: err }));
    };
    const onClose = (): void => {
      cleanup();
      reject(new DmError('ECONNRESET', 'connection closed during TLS handshake'));
    };
    tsock.on('secure', onSecure);
    tsock.on('error', onError);
    tsock.on('close', onClose);
  });
}

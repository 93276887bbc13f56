/**
 * The replication handshake, both ends: version negotiation, optional TLS, then a mutual
 * HMAC-SHA256 challenge–response over the shared secret. Nothing but these frames is
 * accepted before AUTH_OK, so no data flows to or from an unauthenticated peer.
 *
 *   C → S  HELLO          {min, max, tls, tlsMode: psk|cert, name, features: [digest, entry-crc, pipeline, roles]}
 *   S → C  HELLO_REPLY    {version, tls, features: [the common ones]}   (or ERROR: no common version, TLS required)
 *          features are optional both ways: a peer that sends none (an older build) gets none
 *          back, and neither side uses a feature the other did not name
 *          … both sides start TLS here when tls is true: a PSK derived from the secret, or
 *            certificates both ways (tls-certs.ts) …
 *   C → S  AUTH_CHALLENGE {nonce: Nc}
 *   S → C  AUTH_RESPONSE  {nonce: Ns, mac: HMAC(secret, "dmkit-replication server" v Nc Ns)}
 *   C → S  AUTH_PROOF     {mac: HMAC(secret, "dmkit-replication client" v Ns Nc)}
 *   S → C  AUTH_OK        (or ERROR EACCES, and the connection is closed)
 *
 * The client checks the receiver's proof before it proves itself, so neither side learns
 * anything it could replay: each proof binds both fresh nonces and its own role.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { DmError } from '../core/errors.ts';
import { readSecretFile } from '../core/secret-file.ts';
import { startTls as clientTls } from '../nbd/client-handshake.ts';
import { pskServerConfig, startTls as serverTls, type TlsServerConfig } from '../nbd/tls.ts';
import { FrameSocket, type Frame } from './frame-socket.ts';
import { clientCertTls, serverCertTls, type CertTls } from './tls-certs.ts';
import {
  ENTRY_CRC, FEATURES, FrameType, MAX_CONTROL, MAX_VERSION, MIN_VERSION, ProtocolError, bool, decodeJson, encodeError, encodeJson, hex, str, uint,
} from './protocol.ts';

const NONCE = 32;
const TLS_IDENTITY = 'dmkit-replication';

/** A shared secret: at least 16 bytes, from a file no one else can read. */
export interface Secret {
  readonly file: string;
  readonly key: Buffer;
}

/**
 * Read a secret file: refused (EACCES) when group or others may read or write it, or
 * (EINVAL) when it holds fewer than 16 bytes after trimming; every message names the file.
 */
export function loadSecret(file: string): Secret {
  return { file, key: readSecretFile(file, 'replication secret') };
}

function mac(secret: Secret, role: 'server' | 'client', version: number, a: Buffer, b: Buffer): Buffer {
  return crypto.createHmac('sha256', secret.key).update(`dmkit-replication ${role} ${version}\n`).update(a).update(b).digest();
}

/** the TLS pre-shared key both ends derive from the secret */
function tlsKey(secret: Secret): Buffer {
  return crypto.createHmac('sha256', secret.key).update('dmkit-replication tls psk').digest();
}

/** an ERROR frame from the peer as a DmError (its code and message) */
function peerError(f: Frame, where: string): DmError {
  let code = 'EPROTO';
  let message = 'error frame';
  try {
    const o = decodeJson(f.payload, 'ERROR');
    code = str(o, 'code', 'ERROR', 32);
    message = str(o, 'message', 'ERROR', 2048);
  } catch { /* keep the generic words */ }
  return new DmError(code, `${where}: ${message}`);
}

/**
 * A TLS handshake that failed, as describeTlsError words it. With EACCES (every failure the
 * TLS layer reports) it may be a refusal — different secrets, a certificate not trusted — or
 * a handshake damaged on the wire: a flipped bit in a random or a Finished fails with the
 * same alerts (`bad record mac`, `decrypt error`) as two different secrets, at both ends. The
 * sender tells them apart by trying again at once (sender.ts, #handshake).
 */
export class TlsHandshakeError extends DmError {}

/** OpenSSL's words for a record the other side sealed with a different key: what a TLS-PSK handshake between two different secrets fails with (and one damaged on the way) */
const KEY_MISMATCH = /bad[ _]record[ _]mac|decryption[ _]failed|decrypt[ _]error|cipher[ _]operation[ _]failed/i;

/**
 * A failed TLS handshake as the error both sides report (sender's `lastError`, receiver's
 * refusal): with a pre-shared key derived from the secret, two different secrets fail in
 * TLS itself (the receiver cannot decrypt the sender's Finished, the sender hears the
 * alert), so that case says the secrets differ, as the HMAC check says without TLS, rather
 * than OpenSSL's text. Anything else stays `TLS handshake failed: …`, without OpenSSL's
 * trailing newline. `where` prefixes the message (unless it is there already). A mismatch
 * is EACCES (the sender's link is then `auth-failed`, once a second handshake made at once
 * fails too: a damaged handshake looks the same); anything else keeps its code.
 */
export function describeTlsError(err: unknown, where: string, mode: 'psk' | 'cert' = 'psk'): TlsHandshakeError {
  const e = err as Error & { code?: string; cause?: { code?: string; reason?: string; message?: string } };
  const cause = e.cause ?? {};
  const words = [cause.reason, cause.code, cause.message, e.message].filter((x): x is string => typeof x === 'string').join(' ');
  if (mode === 'psk' && KEY_MISMATCH.test(words)) {
    return new TlsHandshakeError('EACCES', `${where}: authentication failed: the peer's replication secret does not match ours (TLS-PSK handshake failed: bad record mac)`, { cause: err });
  }
  const text = (e.message ?? String(err)).trimEnd();
  const code = typeof e.code === 'string' ? e.code : 'EACCES';
  return new TlsHandshakeError(code, text.startsWith(where) ? text : `${where}: ${text}`, { cause: err });
}

/** `p`, or ETIMEDOUT (and the socket destroyed) at `deadline` */
function beforeDeadline<T>(p: Promise<T>, deadline: number, sock: Socket, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_r, reject) => {
    timer = setTimeout(() => {
      sock.destroy();
      reject(new DmError('ETIMEDOUT', `${what} did not finish in time`));
    }, Math.max(1, deadline - Date.now()));
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

async function expect(fs: FrameSocket, type: FrameType, what: string, deadline: number, where: string): Promise<Frame> {
  const f = await fs.next(Math.max(1, deadline - Date.now()), what);
  if (f.h.type === FrameType.ERROR) throw peerError(f, where);
  if (f.h.type !== type) throw new ProtocolError(`${where}: expected ${what}, got frame type ${f.h.type}`);
  return f;
}

export interface Authenticated {
  readonly frames: FrameSocket;
  readonly version: number;
  readonly tls: boolean;
  /** the optional features both sides named (FEATURES: 'digest', 'entry-crc', 'pipeline', 'roles') */
  readonly features: readonly string[];
}

/** a HELLO's or HELLO_REPLY's `features`: absent = none; otherwise a short list of short strings */
function readFeatures(o: Record<string, unknown>, what: string): string[] {
  const v = o.features;
  if (v === undefined) return [];
  if (!Array.isArray(v) || v.length > 32 || !v.every((x) => typeof x === 'string' && x.length <= 32)) {
    throw new ProtocolError(`${what}: 'features' must be a list of at most 32 names`);
  }
  return v as string[];
}

/** The sender's side (`features`: those offered, default FEATURES). Rejects with EACCES (auth or TLS), ETIMEDOUT, EPROTO, ECONNRESET … */
export async function clientHandshake(
  sock: Socket,
  opts: { secret: Secret; tls: boolean; certs?: CertTls; timeoutMs: number; name: string; where: string; features?: readonly string[] },
): Promise<Authenticated> {
  const deadline = Date.now() + opts.timeoutMs;
  let frames = new FrameSocket(sock, { maxPayload: MAX_CONTROL });
  const tlsMode = opts.certs ? 'cert' : 'psk';
  const mine = opts.features ?? FEATURES;
  frames.send(FrameType.HELLO, 0, [encodeJson({ min: MIN_VERSION, max: MAX_VERSION, tls: opts.tls, tlsMode, name: opts.name, features: mine })]);
  const hr = decodeJson((await expect(frames, FrameType.HELLO_REPLY, 'HELLO_REPLY', deadline, opts.where)).payload, 'HELLO_REPLY');
  const version = uint(hr, 'version', 'HELLO_REPLY');
  if (version < MIN_VERSION || version > MAX_VERSION) throw new ProtocolError(`${opts.where}: receiver chose version ${version}, we speak ${MIN_VERSION}…${MAX_VERSION}`);
  const tls = bool(hr, 'tls', 'HELLO_REPLY');
  const features = readFeatures(hr, 'HELLO_REPLY').filter((x) => mine.includes(x));
  if (tls !== opts.tls) throw new ProtocolError(`${opts.where}: receiver answered tls=${tls} to tls=${opts.tls}`);
  if (tls) {
    frames.detach();
    const start = opts.certs
      ? clientCertTls(sock, opts.certs, opts.where)
      : clientTls(sock, { identity: TLS_IDENTITY, key: tlsKey(opts.secret) }, opts.where);
    const t = await beforeDeadline(start, deadline, sock, `${opts.where}: TLS handshake`)
      .catch((err: unknown) => { throw describeTlsError(err, opts.where, tlsMode); });
    t.resume();
    frames = new FrameSocket(t, { maxPayload: MAX_CONTROL });
  }
  const nc = crypto.randomBytes(NONCE);
  frames.send(FrameType.AUTH_CHALLENGE, 0, [encodeJson({ nonce: nc.toString('hex') })]);
  const ar = decodeJson((await expect(frames, FrameType.AUTH_RESPONSE, 'AUTH_RESPONSE', deadline, opts.where)).payload, 'AUTH_RESPONSE');
  const ns = hex(ar, 'nonce', 'AUTH_RESPONSE', NONCE);
  const theirs = hex(ar, 'mac', 'AUTH_RESPONSE', 32);
  if (!crypto.timingSafeEqual(theirs, mac(opts.secret, 'server', version, nc, ns))) {
    frames.send(FrameType.ERROR, 0, [encodeError('EACCES', 'authentication failed: the sender holds a different secret (the receiver\'s proof did not match it)')]);
    frames.end();
    throw new DmError('EACCES', `${opts.where}: authentication failed: the receiver's proof does not match our secret (${opts.secret.file})`);
  }
  frames.send(FrameType.AUTH_PROOF, 0, [encodeJson({ mac: mac(opts.secret, 'client', version, ns, nc).toString('hex') })]);
  await expect(frames, FrameType.AUTH_OK, 'AUTH_OK', deadline, opts.where);
  return { frames, version, tls, features };
}

/**
 * Who holds a device the receiver opened for a stream, as the busy message of `dmkit
 * remove` names it (MappedDevice.open and close, with the same text): the sending group as
 * its HELLO named it (a tcp slink's name is `<group> slink <N>`), e.g.
 * `receiving replication stream of group 'repl', held while that sender is connected`.
 */
export function receivingHolder(frames: { readonly peerName: string | null }): string {
  const name = frames.peerName;
  const group = name === null ? null : /^(.+) slink [0-9]+$/s.exec(name)?.[1] ?? null;
  const what = group !== null ? `of group '${group}'` : name !== null ? `from '${name}'` : 'from a sender';
  return `receiving replication stream ${what}, held while that sender is connected`;
}

/** What the receiver's side needs. */
export interface ServerAuth {
  readonly secret: Secret;
  /** refuse peers that do not ask for TLS */
  readonly requireTls: boolean;
  /** TLS with certificates, for senders that ask for it (tls-ca=… on their slink) */
  readonly certs?: CertTls;
  readonly timeoutMs: number;
  /** the features offered (default FEATURES: all of this build's; fewer: as an older build would) */
  readonly features?: readonly string[];
}

const tlsConfigs = new WeakMap<Secret, TlsServerConfig>();

/**
 * The receiver's side. On a failure it sends the peer an ERROR frame saying why (where the
 * protocol allows) and rejects; the caller logs it and closes the connection.
 */
export async function serverHandshake(sock: Socket, auth: ServerAuth, where: string): Promise<Authenticated & { name: string }> {
  const deadline = Date.now() + auth.timeoutMs;
  let frames = new FrameSocket(sock, { maxPayload: MAX_CONTROL });
  const refuse = (code: string, message: string): never => {
    frames.send(FrameType.ERROR, 0, [encodeError(code, message)]);
    frames.end();
    throw new DmError(code, `${where}: ${message}`);
  };
  try {
    const hello = decodeJson((await expect(frames, FrameType.HELLO, 'HELLO', deadline, where)).payload, 'HELLO');
    const min = uint(hello, 'min', 'HELLO');
    const max = uint(hello, 'max', 'HELLO');
    const tls = bool(hello, 'tls', 'HELLO');
    const name = str(hello, 'name', 'HELLO', 256);
    const tlsMode = hello.tlsMode === undefined ? 'psk' : str(hello, 'tlsMode', 'HELLO', 8);
    if (tlsMode !== 'psk' && tlsMode !== 'cert') refuse('EPROTO', `unknown tlsMode '${tlsMode}' (expected psk or cert)`);
    const version = Math.min(max, MAX_VERSION);
    if (version < Math.max(min, MIN_VERSION)) refuse('EPROTO', `no common protocol version (peer speaks ${min}…${max}, we speak ${MIN_VERSION}…${MAX_VERSION})`);
    if (auth.requireTls && !tls) refuse('EACCES', 'this receiver requires TLS (set tls=on on the slink)');
    if (tls && tlsMode === 'cert' && !auth.certs) {
      refuse('EACCES', 'this receiver has no TLS certificate (start it with --replication-tls-cert, -key and -ca, or use tls=on without tls-ca=…)');
    }
    const offered = hello.features === undefined ? null : readFeatures(hello, 'HELLO');
    const features = offered?.filter((x) => (auth.features ?? FEATURES).includes(x)) ?? [];
    frames.send(FrameType.HELLO_REPLY, 0, [encodeJson(offered ? { version, tls, features } : { version, tls })]);
    if (tls) {
      frames.detach();
      let start: Promise<TLSSocket>;
      if (tlsMode === 'cert') {
        start = serverCertTls(sock, auth.certs!);
      } else {
        let cfg = tlsConfigs.get(auth.secret);
        if (!cfg) tlsConfigs.set(auth.secret, cfg = pskServerConfig(new Map([[TLS_IDENTITY, tlsKey(auth.secret)]]), true));
        start = serverTls(sock, cfg);
      }
      const t: TLSSocket = await beforeDeadline(start, deadline, sock, `${where}: TLS handshake`)
        .catch((err: unknown) => { throw describeTlsError(err, where, tlsMode as 'psk' | 'cert'); });
      frames = new FrameSocket(t, { maxPayload: MAX_CONTROL });
    }
    const ch = decodeJson((await expect(frames, FrameType.AUTH_CHALLENGE, 'AUTH_CHALLENGE', deadline, where)).payload, 'AUTH_CHALLENGE');
    const nc = hex(ch, 'nonce', 'AUTH_CHALLENGE', NONCE);
    const ns = crypto.randomBytes(NONCE);
    frames.send(FrameType.AUTH_RESPONSE, 0, [encodeJson({ nonce: ns.toString('hex'), mac: mac(auth.secret, 'server', version, nc, ns).toString('hex') })]);
    const pr = decodeJson((await expect(frames, FrameType.AUTH_PROOF, 'AUTH_PROOF', deadline, where)).payload, 'AUTH_PROOF');
    if (!crypto.timingSafeEqual(hex(pr, 'mac', 'AUTH_PROOF', 32), mac(auth.secret, 'client', version, ns, nc))) {
      refuse('EACCES', 'authentication failed: the sender does not know our secret');
    }
    frames.acceptSeeded = features.includes(ENTRY_CRC); // before the sender hears AUTH_OK
    frames.peerName = name;
    frames.send(FrameType.AUTH_OK, 0);
    return { frames, version, tls, features, name };
  } catch (err) {
    if (err instanceof ProtocolError && !frames.failure) refuse('EPROTO', err.message);
    throw err;
  }
}

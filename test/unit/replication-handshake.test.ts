/**
 * The replication handshake's failures as both ends report them, over real loopback
 * sockets: two different secrets with TLS-PSK (`tls=on` without certificates) fail in TLS
 * itself, and must still say that the secrets differ (EACCES, so the sender's link is
 * `auth-failed`), not OpenSSL's text with its trailing newline; the same secrets get in;
 * without TLS the HMAC check says it. describeTlsError on its own: other TLS failures keep
 * their words (trimmed) and code, and a certificate handshake is never called a secret
 * mismatch.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DmError } from '../../src/core/errors.ts';
import { clientHandshake, describeTlsError, loadSecret, serverHandshake, type Secret } from '../../src/replication/handshake.ts';

let dir: string;
let server: net.Server | null = null;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-hs-'));
});
afterEach(async () => {
  if (server) await new Promise((r) => server!.close(r));
  server = null;
  fs.rmSync(dir, { recursive: true, force: true });
});

function secret(name: string, fill: string): Secret {
  const file = path.join(dir, name);
  fs.writeFileSync(file, fill.repeat(32), { mode: 0o600 });
  return loadSecret(file);
}

type Outcome = { ok: true } | { ok: false; code: string; message: string };
const settle = (p: Promise<unknown>): Promise<Outcome> =>
  p.then(() => ({ ok: true as const }), (e: DmError) => ({ ok: false as const, code: e.code, message: e.message }));

/** one handshake between a sender holding `mine` and a receiver holding `theirs` */
async function handshake(mine: Secret, theirs: Secret, tls: boolean): Promise<{ client: Outcome; server: Outcome }> {
  let serverSide!: Promise<Outcome>;
  const accepted = new Promise<void>((resolve) => {
    server = net.createServer((sock) => {
      sock.on('error', () => {});
      serverSide = settle(serverHandshake(sock, { secret: theirs, requireTls: false, timeoutMs: 5000 }, 'replication from peer'))
        .finally(() => sock.destroy());
      resolve();
    });
  });
  await new Promise<void>((r) => server!.listen(0, '127.0.0.1', r));
  const sock = net.connect((server!.address() as net.AddressInfo).port, '127.0.0.1');
  sock.on('error', () => {});
  await new Promise((r) => sock.once('connect', r));
  const client = await settle(clientHandshake(sock, { secret: mine, tls, timeoutMs: 5000, name: 'repl', where: 'slink 1: 127.0.0.1:7788' }));
  await accepted;
  const result = { client, server: await serverSide };
  sock.destroy();
  return result;
}

describe('replication handshake: a wrong secret', () => {
  it('with TLS-PSK, both sides say the secrets differ (EACCES), not OpenSSL\'s words', async () => {
    const r = await handshake(secret('a.key', 'a'), secret('b.key', 'b'), true);
    expect(r.client).toEqual({
      ok: false, code: 'EACCES',
      message: "slink 1: 127.0.0.1:7788: authentication failed: the peer's replication secret does not match ours (TLS-PSK handshake failed: bad record mac)",
    });
    expect(r.server).toEqual({
      ok: false, code: 'EACCES',
      message: "replication from peer: authentication failed: the peer's replication secret does not match ours (TLS-PSK handshake failed: bad record mac)",
    });
  });

  it('with TLS-PSK and the same secret, both sides get in', async () => {
    const r = await handshake(secret('a.key', 'a'), secret('a2.key', 'a'), true);
    expect(r).toEqual({ client: { ok: true }, server: { ok: true } });
  });

  it('without TLS, the HMAC check says it (unchanged)', async () => {
    const mine = secret('a.key', 'a');
    const r = await handshake(mine, secret('b.key', 'b'), false);
    expect(r.client).toEqual({
      ok: false, code: 'EACCES',
      message: `slink 1: 127.0.0.1:7788: authentication failed: the receiver's proof does not match our secret (${mine.file})`,
    });
    // the sender checks the receiver's proof first, and tells it so
    expect(r.server).toEqual({
      ok: false, code: 'EACCES',
      message: "replication from peer: authentication failed: the sender holds a different secret (the receiver's proof did not match it)",
    });
  });
});

describe('describeTlsError', () => {
  const openssl = (reason: string, code: string): Error =>
    Object.assign(new Error(`80AC0C6A807F0000:error:0A0003FC:SSL routines:ssl3_read_bytes:${reason}:../deps/openssl/ssl/record/rec_layer_s3.c:1601:SSL alert number 20\n`), { reason, code });

  it('a record the peer could not decrypt, either side\'s words, is a secret mismatch with PSK', () => {
    for (const [reason, code] of [['sslv3 alert bad record mac', 'ERR_SSL_SSLV3_ALERT_BAD_RECORD_MAC'], ['cipher operation failed', 'ERR_SSL_CIPHER_OPERATION_FAILED'], ['decryption failed or bad record mac', 'ERR_SSL_DECRYPTION_FAILED_OR_BAD_RECORD_MAC']]) {
      const wrapped = new DmError('EPERM', `TLS handshake failed: ${openssl(reason, code).message}`, { cause: openssl(reason, code) });
      const e = describeTlsError(wrapped, 'here');
      expect(e.code).toBe('EACCES');
      expect(e.message).toBe("here: authentication failed: the peer's replication secret does not match ours (TLS-PSK handshake failed: bad record mac)");
    }
  });

  it('anything else keeps its words without the trailing newline, and its code; certificates are never a secret mismatch', () => {
    const reset = describeTlsError(new DmError('ECONNRESET', 'connection closed during TLS handshake'), 'replication from peer');
    expect([reset.code, reset.message]).toEqual(['ECONNRESET', 'replication from peer: connection closed during TLS handshake']);
    const cert = describeTlsError(new DmError('EACCES', `here: TLS handshake failed: ${openssl('sslv3 alert bad record mac', 'X').message}`), 'here', 'cert');
    expect(cert.code).toBe('EACCES');
    expect(cert.message).toMatch(/^here: TLS handshake failed: .*SSL alert number 20$/);
  });
});

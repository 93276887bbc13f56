/**
 * TLS with certificates for replication, the alternative to the pre-shared key derived
 * from the secret: each side presents a certificate signed by a CA the other trusts, and
 * both verify the other's chain (mutual TLS). The HMAC challenge–response over the shared
 * secret still runs inside, so a certificate alone never lets a peer send data.
 *
 *   sender (slink):   tls=on tls-ca=ca.pem tls-cert=siteA.pem tls-key=siteA.key
 *   receiver:         --replication-tls-ca ca.pem --replication-tls-cert siteB.pem --replication-tls-key siteB.key
 *
 * The peer's name is not checked against the certificate (sites are reached by address,
 * often an IP): the chain to the configured CA is what is verified.
 */
import fs from 'node:fs';
import type { Socket } from 'node:net';
import tls, { createSecureContext, type TLSSocket } from 'node:tls';
import { DmError } from '../core/errors.ts';

export interface CertFiles {
  readonly ca: string;
  readonly cert: string;
  readonly key: string;
}

export interface CertTls {
  readonly files: CertFiles;
  readonly ca: Buffer;
  readonly cert: Buffer;
  readonly key: Buffer;
}

/**
 * Read the three files (`what` names the option set for messages). The key file must not
 * be readable by others (EACCES); a file that cannot be read or is not PEM is EINVAL.
 */
export function loadCerts(files: CertFiles, what: string): CertTls {
  const read = (file: string, label: string): Buffer => {
    let b: Buffer;
    try {
      b = fs.readFileSync(file);
    } catch (err) {
      throw new DmError('EINVAL', `${what}: cannot read the TLS ${label} ${file}: ${(err as Error).message}`);
    }
    if (!b.toString('latin1').includes('-----BEGIN ')) throw new DmError('EINVAL', `${what}: the TLS ${label} ${file} is not PEM`);
    return b;
  };
  const ca = read(files.ca, 'CA');
  const cert = read(files.cert, 'certificate');
  const key = read(files.key, 'key');
  const mode = fs.statSync(files.key).mode & 0o777;
  if ((mode & 0o077) !== 0) {
    throw new DmError('EACCES', `${what}: the TLS key ${files.key} has mode ${mode.toString(8).padStart(4, '0')}, others may read it; chmod 600 it (refused)`);
  }
  try {
    createSecureContext({ ca, cert, key, minVersion: 'TLSv1.2' }); // refused here, at load, rather than at the first connection
  } catch (err) {
    throw new DmError('EINVAL', `${what}: the TLS certificate and key do not load: ${(err as Error).message}`);
  }
  return { files, ca, cert, key };
}

/** the sender's side on a connected socket: verify the receiver's chain, present ours */
export function clientCertTls(sock: Socket, c: CertTls, where: string): Promise<TLSSocket> {
  sock.on('error', () => {});
  return new Promise((resolve, reject) => {
    const t = tls.connect({
      socket: sock, ca: c.ca, cert: c.cert, key: c.key, minVersion: 'TLSv1.2', rejectUnauthorized: true,
      checkServerIdentity: () => undefined, // by address: the chain to our CA is what counts
    });
    t.once('error', (err) => {
      t.destroy();
      reject(new DmError('EACCES', `${where}: TLS handshake failed: ${err.message}`));
    });
    t.once('secureConnect', () => resolve(t));
  });
}

/**
 * The receiver's side: present our certificate, require the sender's and verify its chain.
 * A `tls.Server` (one per connection, handed the accepted socket) does the verification: a
 * TLSSocket made by hand would not refuse an unverified client.
 */
export function serverCertTls(sock: Socket, c: CertTls): Promise<TLSSocket> {
  const server = tls.createServer({ ca: c.ca, cert: c.cert, key: c.key, minVersion: 'TLSv1.2', requestCert: true, rejectUnauthorized: true });
  return new Promise((resolve, reject) => {
    server.once('secureConnection', (t: TLSSocket) => resolve(t));
    server.once('tlsClientError', (err: Error) => {
      sock.destroy();
      reject(new DmError('EACCES', `TLS handshake failed: ${err.message} (a sender certificate not signed by our CA, or none)`));
    });
    server.emit('connection', sock);
  });
}

/**
 * Plugs the replication receiver into the daemon when `--replication-listen HOST:PORT` is
 * given (loopback unless the user names another address): `tcp` slinks of other sites
 * send to this daemon's devices. `--replication-secret FILE` is required with it, and a
 * file others may read is refused before anything listens.
 */
import { DmError } from '../core/errors.ts';
import { log } from '../core/log.ts';
import { loadSecret } from '../replication/handshake.ts';
import { positionsDir, ReplicationReceiver } from '../replication/receiver.ts';
import { loadCerts } from '../replication/tls-certs.ts';
import type { Daemon, DaemonExtension, DaemonOptions } from './daemon.ts';
import { parseListen } from './listen.ts';

export function replicationExtension(opts: DaemonOptions): DaemonExtension | null {
  if (!opts.replicationListen) {
    if (opts.replicationSecret) throw new DmError('EINVAL', '--replication-secret needs --replication-listen HOST:PORT');
    return null;
  }
  const listen = parseListen(opts.replicationListen, '--replication-listen');
  if (!opts.replicationSecret) throw new DmError('EINVAL', '--replication-listen needs --replication-secret FILE (a shared secret, mode 0600)');
  const secret = loadSecret(opts.replicationSecret);
  const files = [opts.replicationTlsCa, opts.replicationTlsCert, opts.replicationTlsKey];
  if (files.some((f) => f !== undefined) && files.some((f) => f === undefined)) {
    throw new DmError('EINVAL', '--replication-tls-ca, --replication-tls-cert and --replication-tls-key go together');
  }
  const certs = opts.replicationTlsCa
    ? loadCerts({ ca: opts.replicationTlsCa, cert: opts.replicationTlsCert!, key: opts.replicationTlsKey! }, '--replication-tls-key')
    : undefined;
  let rx: ReplicationReceiver | null = null;
  return {
    name: 'replication',
    async start(d: Daemon): Promise<void> {
      const r = new ReplicationReceiver(d.dm, {
        host: listen.host, port: listen.port, secret, certs, requireTls: opts.replicationTls === 'require', stateDir: positionsDir(d.stateDir),
      }, log('replication'));
      d.replicationTcp = await r.listen();
      d.receiver = r;
      rx = r;
    },
    async stop(): Promise<void> {
      await rx?.close();
      rx = null;
    },
  };
}

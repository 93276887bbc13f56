/**
 * Plugs the NBD export into the daemon: every active device is served on
 * `<runtime>/nbd.sock` (mode 0600), and on TCP when `--nbd-listen HOST:PORT` is given
 * (loopback unless the user names another address). TLS-PSK when `--tls-psk FILE` is given.
 */
import path from 'node:path';
import { DmError } from '../core/errors.ts';
import { deviceExports } from '../nbd/provider.ts';
import { NbdServer } from '../nbd/server.ts';
import type { Daemon, DaemonExtension, DaemonOptions } from './daemon.ts';
import { parseListen } from './listen.ts';

export function nbdSocketPath(runtimeDir: string): string {
  return path.join(runtimeDir, 'nbd.sock');
}

export function nbdExtension(opts: DaemonOptions): DaemonExtension {
  if (opts.tls && !opts.tlsPsk) throw new DmError('EINVAL', `--tls ${opts.tls} needs --tls-psk FILE`);
  const listen = opts.nbdListen ? parseListen(opts.nbdListen) : null;
  let server: NbdServer | null = null;
  return {
    name: 'nbd',
    async start(d: Daemon): Promise<void> {
      const tls = opts.tlsPsk ? { pskFile: opts.tlsPsk, require: opts.tls === 'require' } : undefined;
      const srv = new NbdServer(deviceExports(d.dm), { tls, threads: opts.nbdThreads });
      try {
        await srv.listenUnix(nbdSocketPath(d.runtimeDir));
        if (listen) {
          const { port } = await srv.listenTcp(listen.host, listen.port);
          d.nbdTcp = { host: listen.host, port };
        }
      } catch (err) {
        // the daemon stops only extensions that started: release the Unix listener here,
        // or it keeps a daemon that failed to start (e.g. TCP port in use) from exiting
        await srv.close();
        throw err;
      }
      srv.prestartThreads();
      server = srv;
    },
    async stop(): Promise<void> {
      await server?.close();
      server = null;
    },
  };
}

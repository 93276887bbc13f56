/**
 * Plugs the HTTP listener into the daemon when `--http-listen HOST:PORT` is given: metrics,
 * the status page and its API (app.ts). Loopback unless the user names another address;
 * changes over HTTP only with `--http-token FILE` (a secret of 16 bytes or more, mode 0600).
 */
import { DmError } from '../core/errors.ts';
import { log } from '../core/log.ts';
import { readSecretFile } from '../core/secret-file.ts';
import type { Daemon, DaemonExtension, DaemonOptions } from '../daemon/daemon.ts';
import { parseListen } from '../daemon/listen.ts';

export function httpExtension(opts: DaemonOptions): DaemonExtension | null {
  if (!opts.httpListen) {
    if (opts.httpToken) throw new DmError('EINVAL', '--http-token needs --http-listen HOST:PORT');
    return null;
  }
  const listen = parseListen(opts.httpListen, '--http-listen');
  const token = opts.httpToken ? readSecretFile(opts.httpToken, 'HTTP token') : null;
  let stop: (() => Promise<void>) | null = null;
  return {
    name: 'http',
    async start(d: Daemon): Promise<void> {
      // fastify loads only when asked for: a daemon without --http-listen never pays for it
      const { buildHttpApp } = await import('./app.ts');
      const { app, closeStreams } = buildHttpApp(d.opContext, { token });
      await app.listen({ host: listen.host, port: listen.port });
      const addr = app.server.address();
      d.httpTcp = typeof addr === 'object' && addr ? { host: addr.address, port: addr.port } : { host: listen.host, port: listen.port };
      log('http').info(`HTTP listener on http://${listen.host.includes(':') ? `[${d.httpTcp.host}]` : d.httpTcp.host}:${d.httpTcp.port}/ (${token ? 'changes with the token' : 'read-only'})`);
      stop = async () => {
        closeStreams();
        await app.close();
      };
    },
    async stop(): Promise<void> {
      await stop?.();
      stop = null;
    },
  };
}

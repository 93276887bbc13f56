/** The `--nbd-listen` and `--replication-listen` addresses (kept apart so the CLI can check it without loading the server). */
import { DmError } from '../core/errors.ts';

/** `HOST:PORT`, `[v6]:PORT` or `PORT` (loopback) */
export function parseListen(spec: string, option = '--nbd-listen'): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(spec) ?? /^()()(\d{1,5})$/.exec(spec);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 0 && port <= 65535)) {
    throw new DmError('EINVAL', `${option}: expected HOST:PORT, [IPv6]:PORT or PORT (e.g. 127.0.0.1:10809), got '${spec}'`);
  }
  return { host: m[1] || m[2] || '127.0.0.1', port };
}

/**
 * Scoped logging (`log('mirror')`) over pino: one JSON line per message on stderr (the
 * daemon's log file when it runs in the background), e.g.
 *
 *   {"level":"warn","time":"2026-11-25T15:50:01.123Z","scope":"mirror","msg":"leg 1 failed: …"}
 *
 * Quiet below `warn` unless DMKIT_LOG (debug, info, warn, error, silent) says otherwise; the
 * level is read when the first message is written, so a program may set DMKIT_LOG after
 * importing dmkit. Writes are synchronous, so the last lines before a crash are on disk.
 * `limited` is for I/O paths: at most one message per key per second.
 */
import { pino, type Logger as Pino } from 'pino';

export interface Logger {
  debug(msg: string): void;
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
  /** at most one message per `key` per second */
  limited(key: string, msg: string): void;
}

const LEVELS = new Set(['debug', 'info', 'warn', 'error', 'silent']);

let root: Pino | null = null;

function rootLogger(): Pino {
  if (root) return root;
  const env = process.env.DMKIT_LOG ?? 'warn';
  root = pino(
    {
      level: LEVELS.has(env) ? env : 'warn',
      base: undefined,
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    pino.destination({ fd: 2, sync: true }),
  );
  return root;
}

export function log(scope: string): Logger {
  let scoped: Pino | null = null;
  const get = (): Pino => (scoped ??= rootLogger().child({ scope }));
  const last = new Map<string, number>();
  return {
    debug: (m) => get().debug(m),
    info: (m) => get().info(m),
    warn: (m) => get().warn(m),
    error: (m) => get().error(m),
    limited(key, msg) {
      const now = Date.now();
      if ((last.get(key) ?? 0) + 1000 > now) return;
      last.set(key, now);
      get().warn(msg);
    },
  };
}

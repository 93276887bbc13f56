/** Scoped logging (`log('mirror')`), quiet unless DMKIT_LOG is set; rate-limited helper for I/O paths. */
export interface Logger {
  debug(msg: string): void;
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
  /** at most one message per `key` per second */
  limited(key: string, msg: string): void;
}

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 } as const;
type Level = keyof typeof LEVELS;

function threshold(): number {
  const env = (process.env.DMKIT_LOG ?? 'warn') as Level;
  return LEVELS[env] ?? LEVELS.warn;
}

export function log(scope: string): Logger {
  const last = new Map<string, number>();
  const emit = (level: Level, msg: string): void => {
    if (LEVELS[level] < threshold()) return;
    process.stderr.write(`dmkit ${level} [${scope}] ${msg}\n`);
  };
  return {
    debug: (m) => emit('debug', m),
    info: (m) => emit('info', m),
    warn: (m) => emit('warn', m),
    error: (m) => emit('error', m),
    limited(key, msg) {
      const now = Date.now();
      if ((last.get(key) ?? 0) + 1000 > now) return;
      last.set(key, now);
      emit('warn', msg);
    },
  };
}

/**
 * Which of the receiver's devices receive which stream (they are secondary: EROFS for
 * their other writers), kept in `<state>/replication/roles.json` so that a restarted
 * receiver makes them secondary again before anything listens.
 */
import fs from 'node:fs';
import type { Logger } from '../core/log.ts';

export const ROLE = 'replication stream ';
/** a secondary device's owner label for stream `id` (MappedDevice.secondary) */
export function roleOf(id: string): string {
  return `${ROLE}${id}`;
}

export function readRoles(file: string, log: Logger): Map<string, string> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return new Map();
  }
  try {
    const o = JSON.parse(text) as Record<string, unknown>;
    return new Map(Object.entries(o).filter((e): e is [string, string] => typeof e[1] === 'string'));
  } catch (err) {
    log.error(`replication: ${file}: unreadable (${(err as Error).message}); no device is secondary until its sender reconnects`);
    return new Map();
  }
}

/** write the roles atomically (temp file, rename) */
export function writeRoles(file: string, roles: ReadonlyMap<string, string>): void {
  fs.writeFileSync(`${file}.tmp`, `${JSON.stringify(Object.fromEntries(roles), null, 1)}\n`, { mode: 0o600 });
  fs.renameSync(`${file}.tmp`, file);
}

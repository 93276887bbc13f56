/**
 * Where the daemon keeps its runtime files (control socket, pid, log) and its persisted
 * device set. Pure lookups plus one helper that creates a private directory.
 *
 *   runtime: $DMKIT_RUNTIME_DIR, else /run/dmkit for root, else $XDG_RUNTIME_DIR/dmkit,
 *            else /tmp/dmkit-$UID. Root's is /run/dmkit even where a login session sets
 *            XDG_RUNTIME_DIR=/run/user/0: the CLI of an ssh session must find the daemon
 *            that systemd or Pacemaker started, not autostart a second one beside it.
 *   state:   $DMKIT_STATE_DIR, else /var/lib/dmkit for root, else ~/.local/state/dmkit
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DmError } from '../core/errors.ts';

type Env = Record<string, string | undefined>;

function uid(): number {
  return typeof process.getuid === 'function' ? process.getuid() : -1;
}

export function runtimeDir(env: Env = process.env): string {
  if (env.DMKIT_RUNTIME_DIR) return path.resolve(env.DMKIT_RUNTIME_DIR);
  if (uid() === 0) return '/run/dmkit';
  if (env.XDG_RUNTIME_DIR) return path.join(env.XDG_RUNTIME_DIR, 'dmkit');
  return `/tmp/dmkit-${uid()}`;
}

export function stateDir(env: Env = process.env): string {
  if (env.DMKIT_STATE_DIR) return path.resolve(env.DMKIT_STATE_DIR);
  if (uid() === 0) return '/var/lib/dmkit';
  return path.join(env.HOME || os.homedir(), '.local', 'state', 'dmkit');
}

/** The files of one runtime directory. */
export interface RuntimePaths {
  dir: string;
  socket: string;
  pid: string;
  log: string;
  lock: string;
}

export function runtimePaths(dir: string): RuntimePaths {
  return {
    dir,
    socket: path.join(dir, 'control.sock'),
    pid: path.join(dir, 'daemon.pid'),
    log: path.join(dir, 'daemon.log'),
    lock: path.join(dir, 'daemon.lock'),
  };
}

export function stateFile(dir: string): string {
  return path.join(dir, 'devices.json');
}

/**
 * Create `dir` (and parents) with mode 0700. An existing directory must be a directory we
 * own; when we create it, nobody else ever sees it with looser permissions.
 */
export function ensurePrivateDir(dir: string): void {
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw new DmError('EACCES', `cannot create directory ${dir}: ${(err as Error).message}`);
  }
  const st = fs.statSync(dir);
  if (!st.isDirectory()) throw new DmError('ENOTDIR', `${dir} exists and is not a directory`);
  if (uid() >= 0 && st.uid !== uid()) {
    throw new DmError('EACCES', `${dir} is owned by uid ${st.uid}, not by us (uid ${uid()}); refusing to use it`);
  }
}

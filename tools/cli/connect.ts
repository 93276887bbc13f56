/**
 * Reaching the daemon: connect to `<runtime>/control.sock`, and when nothing listens there
 * start a daemon in the background (detached, output to `<runtime>/daemon.log`) and wait
 * until its socket accepts.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { DmError } from '../../src/core/errors.ts';
import { ControlClient } from '../../src/daemon/client.ts';
import { ensurePrivateDir, runtimeDir, runtimePaths, type RuntimePaths } from '../../src/daemon/paths.ts';
import type { HelloResult } from '../../src/daemon/protocol.ts';

const START_TIMEOUT_MS = 30_000;
/** bin/dmkit.js (it tells us where it is when it runs the bundle, whose own URL is elsewhere) */
const BIN = (globalThis as { DMKIT_BIN?: string }).DMKIT_BIN ?? fileURLToPath(new URL('../../bin/dmkit.js', import.meta.url));

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function paths(): RuntimePaths {
  return runtimePaths(runtimeDir());
}

/** no daemon behind the socket (as opposed to, say, a permission problem) */
function notRunning(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ENOENT' || code === 'ECONNREFUSED';
}

export async function isRunning(p: RuntimePaths): Promise<boolean> {
  try {
    (await ControlClient.connect(p.socket)).close();
    return true;
  } catch {
    return false;
  }
}

/** the pid of the daemon answering on the socket, null when none answers */
async function runningPid(p: RuntimePaths): Promise<number | null> {
  let c: ControlClient;
  try {
    c = await ControlClient.connect(p.socket);
  } catch {
    return null;
  }
  try {
    return (await c.request<HelloResult>('hello')).pid;
  } catch {
    return null;
  } finally {
    c.close();
  }
}

/**
 * No daemon answers and none may be started (`--no-autostart`): the CLI exits with
 * NO_DAEMON_STATUS, not 1, so scripts and cluster agents need not parse the message.
 */
export class NoDaemonError extends DmError {
  constructor(socket: string) {
    super('ECONNREFUSED', `no daemon is running (nothing listens on ${socket}); start one with 'dmkit daemon' or leave out --no-autostart`);
  }
}

/** the exit status for NoDaemonError (LSB's "program is not running") */
export const NO_DAEMON_STATUS = 3;

export async function connect(opts: { autostart: boolean }): Promise<ControlClient> {
  const p = paths();
  try {
    return await ControlClient.connect(p.socket);
  } catch (err) {
    if (!notRunning(err)) throw new DmError('ECONNREFUSED', `cannot connect to the daemon at ${p.socket}: ${(err as Error).message}`);
    if (!opts.autostart) {
      throw new NoDaemonError(p.socket);
    }
  }
  await spawnDaemon(p, []);
  return ControlClient.connect(p.socket);
}

function logTail(file: string): string {
  try {
    const lines = fs.readFileSync(file, 'utf8').trimEnd().split('\n');
    return lines.slice(-10).join('\n');
  } catch {
    return '(no log)';
  }
}

/**
 * Start `dmkit daemon --foreground ARGS` detached from this process and wait until its
 * control socket accepts. If it exits first, another daemon may have won a start race:
 * that one is used if its socket accepts, else the error names the log and quotes it.
 */
export async function spawnDaemon(p: RuntimePaths, args: string[]): Promise<void> {
  ensurePrivateDir(p.dir);
  const logFd = fs.openSync(p.log, 'a', 0o600);
  let exited: string | null = null;
  let child: ChildProcess;
  try {
    child = spawn(process.execPath, [BIN, 'daemon', '--foreground', ...args], {
      detached: true, stdio: ['ignore', logFd, logFd], env: process.env,
    });
    child.on('error', (err) => (exited = err.message));
    child.on('exit', (code, signal) => (exited = signal ? `killed by ${signal}` : `exit status ${code}`));
    child.unref();
  } finally {
    fs.closeSync(logFd);
  }
  const deadline = Date.now() + START_TIMEOUT_MS;
  let exitedAt = 0;
  while (Date.now() < deadline) {
    const pid = await runningPid(p);
    if (pid !== null) {
      // another daemon won a start race: stop ours, or it would start later on its own
      if (pid !== child.pid && !exited) child.kill('SIGTERM');
      return;
    }
    if (exited) {
      exitedAt ||= Date.now();
      if (Date.now() - exitedAt > 1000) {
        throw new DmError('ESRCH', `the daemon did not start (${exited}); from ${p.log}:\n${logTail(p.log)}`);
      }
    }
    await sleep(40);
  }
  throw new DmError('ETIMEDOUT', `the daemon did not accept connections on ${p.socket} within ${START_TIMEOUT_MS / 1000} s; see ${p.log}`);
}

/**
 * e2e helpers: a private runtime/state directory per test file, the real CLI run as a
 * child process (`node bin/dmkit.js …`), the daemon it autostarts, and a
 * protocol client for byte-level I/O through the daemon.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ControlClient } from '../../src/daemon/client.ts';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
/** the user's entry point: runs the bundle built by `npm ci` while fresh, else the sources via tsx */
const CLI = path.join(ROOT, 'bin', 'dmkit.js');

export interface Sandbox {
  dir: string;
  runtimeDir: string;
  stateDir: string;
  socket: string;
  pidFile: string;
  stateFile: string;
  env: NodeJS.ProcessEnv;
}

export interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
  raw: Buffer;
}

/** sandboxes and CLI processes of this test worker, killed when it exits whatever happens */
const live = new Set<Sandbox>();
const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
  for (const sb of live) {
    const pid = sandboxDaemon(sb);
    if (pid) process.kill(pid, 'SIGKILL');
  }
});

export function sandbox(): Sandbox {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-e2e-'));
  const runtimeDir = path.join(dir, 'run');
  const stateDir = path.join(dir, 'state');
  const env: NodeJS.ProcessEnv = { ...process.env, DMKIT_RUNTIME_DIR: runtimeDir, DMKIT_STATE_DIR: stateDir, LANG: 'C.UTF-8', LC_ALL: 'C.UTF-8' };
  delete env.DMKIT_LOG;
  delete env.NODE_OPTIONS;
  const sb: Sandbox = {
    dir, runtimeDir, stateDir, env,
    socket: path.join(runtimeDir, 'control.sock'),
    pidFile: path.join(runtimeDir, 'daemon.pid'),
    stateFile: path.join(stateDir, 'devices.json'),
  };
  live.add(sb);
  return sb;
}

export interface Running {
  child: ChildProcess;
  done: Promise<Result>;
  /** resolves once the process has written `text` to stderr (rejects if it exits first) */
  stderrHas(text: string): Promise<void>;
}

/** Start the CLI; stdin gets `input` (default: nothing) and is closed. */
export function start(sb: Sandbox, args: string[], opts: { input?: string | Buffer; env?: NodeJS.ProcessEnv } = {}): Running {
  const child = spawn(process.execPath, [CLI, ...args], { cwd: ROOT, env: { ...sb.env, ...opts.env }, stdio: ['pipe', 'pipe', 'pipe'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  child.stdout!.on('data', (c: Buffer) => out.push(c));
  child.stderr!.on('data', (c: Buffer) => err.push(c));
  child.stdin!.on('error', () => undefined);
  child.stdin!.end(opts.input ?? '');
  const done = new Promise<Result>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code) => {
      const raw = Buffer.concat(out);
      resolve({ code, stdout: raw.toString('utf8'), stderr: Buffer.concat(err).toString('utf8'), raw });
    });
  });
  const stderrHas = (text: string): Promise<void> => new Promise((resolve, reject) => {
    const check = (): boolean => Buffer.concat(err).toString('utf8').includes(text);
    if (check()) return resolve();
    const onData = (): void => {
      if (check()) {
        child.stderr!.off('data', onData);
        resolve();
      }
    };
    child.stderr!.on('data', onData);
    void done.then((r) => reject(new Error(`exited (${r.code}) before writing '${text}' to stderr: ${r.stderr}`)));
  });
  return { child, done, stderrHas };
}

/** Run `dmkit ARGS` to completion. */
export function dmkit(sb: Sandbox, args: string[], opts: { input?: string | Buffer; env?: NodeJS.ProcessEnv } = {}): Promise<Result> {
  return start(sb, args, opts).done;
}

/** Run `dmkit ARGS`, expect exit 0 and no stderr; returns stdout. */
export async function ok(sb: Sandbox, args: string[], opts: { input?: string | Buffer } = {}): Promise<string> {
  const r = await dmkit(sb, args, opts);
  if (r.code !== 0 || r.stderr !== '') {
    throw new Error(`dmkit ${args.join(' ')} → exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }
  return r.stdout;
}

export function daemonPid(sb: Sandbox): number {
  return Number(fs.readFileSync(sb.pidFile, 'utf8').trim());
}

/**
 * The pid in the sandbox's pid file if that process is alive and is this sandbox's daemon
 * (its environment names the sandbox's runtime dir), else 0. A daemon killed with SIGKILL
 * leaves its pid file behind, and on a machine with pid_max 32768 a test run goes round the
 * pids: a signal sent to the stale pid would hit whatever process had it by then (an nbdkit
 * of another test file, say, which would then stop serving mid-test).
 */
export function sandboxDaemon(sb: Sandbox): number {
  let pid: number;
  let environ: string;
  try {
    pid = daemonPid(sb);
    environ = fs.readFileSync(`/proc/${pid}/environ`, 'latin1');
  } catch {
    return 0;
  }
  return isAlive(pid) && environ.split('\0').includes(`DMKIT_RUNTIME_DIR=${sb.runtimeDir}`) ? pid : 0;
}

/** running, and not a zombie waiting for init to reap it */
export function isAlive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}

export async function waitGone(pid: number, limitMs = 30_000): Promise<void> {
  for (const end = Date.now() + limitMs; Date.now() < end; ) {
    if (!isAlive(pid)) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`process ${pid} still running after ${limitMs} ms`);
}

/** Signal the daemon and wait until it is gone. Returns its pid. */
export async function signalDaemon(sb: Sandbox, signal: NodeJS.Signals): Promise<number> {
  const pid = sandboxDaemon(sb);
  if (!pid) throw new Error(`no daemon of this sandbox is running (pid file: ${fs.existsSync(sb.pidFile) ? daemonPid(sb) : 'none'})`);
  process.kill(pid, signal);
  await waitGone(pid);
  return pid;
}

/** Stop whatever daemon the sandbox has and delete the sandbox. */
export async function cleanup(sb: Sandbox): Promise<void> {
  live.delete(sb);
  const pid = sandboxDaemon(sb);
  if (pid) {
    process.kill(pid, 'SIGTERM');
    await waitGone(pid, 15_000).catch(() => process.kill(pid, 'SIGKILL'));
  }
  fs.rmSync(sb.dir, { recursive: true, force: true });
}

export function client(sb: Sandbox): Promise<ControlClient> {
  return ControlClient.connect(sb.socket);
}

/** An image file of `bytes` bytes filled by `fill(i)` per byte (default zeroes). */
export function image(sb: Sandbox, name: string, bytes: number, fill?: (i: number) => number): string {
  const file = path.join(sb.dir, name);
  const buf = Buffer.alloc(bytes);
  if (fill) for (let i = 0; i < bytes; i++) buf[i] = fill(i);
  fs.writeFileSync(file, buf);
  return file;
}

/** deterministic pseudo-random bytes */
export function pattern(bytes: number, seed: number): Buffer {
  const buf = Buffer.alloc(bytes);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < bytes; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf[i] = x & 0xff;
  }
  return buf;
}

/**
 * A plugin module with a `counter` target: status `N/M`, progress 8 sectors per step until
 * complete, message `step [K]` raises an event, `get` replies.
 */
export function counterPlugin(sb: Sandbox): string {
  const file = path.join(sb.dir, 'counter-plugin.mjs');
  fs.writeFileSync(file, `export default {
  name: 'counter',
  version: [1, 2, 3],
  create(ctx, args) {
    const total = Number(args[0] ?? 4);
    let done = 0;
    return {
      map(bio) { if (bio.op === 'read') bio.data.fill(0); return Promise.resolve(); },
      status(type) { return type === 'table' ? String(total) : done + '/' + total; },
      progress() { return done < total ? { work: 'count', doneSectors: done * 8, totalSectors: total * 8 } : null; },
      message(args) {
        if (args[0] === 'step') { done = Math.min(total, done + Number(args[1] ?? 1)); ctx.event(); return; }
        if (args[0] === 'get') return 'done ' + done;
        throw new Error("counter: unknown message '" + args.join(' ') + "' (expected step [N] or get)");
      },
    };
  },
};
`);
  return file;
}

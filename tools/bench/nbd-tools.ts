/**
 * Helpers for the NBD and mirror suites (n-nbd.ts, m-mirror.ts): servers run as processes
 * of their own (the dmkit daemon, nbdkit), per-process peak RSS and CPU from /proc, and
 * the external clients (fio's `nbd` engine, nbdcopy, cp).
 *
 * Every process started here gets the benchmark's `--env` on top of the inherited
 * environment (the same for dmkit and its reference) and is stopped by its own pid.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { REPO_ROOT } from './child.ts';

const CLK_TCK = 100; // Linux USER_HZ on every architecture Node runs on

/** peak RSS (VmHWM) and current RSS of a live process, KiB; null when it is gone */
export function procMemKiB(pid: number): { hwm: number; rss: number } | null {
  try {
    const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const hwm = /^VmHWM:\s+(\d+)/m.exec(s);
    const rss = /^VmRSS:\s+(\d+)/m.exec(s);
    return hwm && rss ? { hwm: Number(hwm[1]), rss: Number(rss[1]) } : null;
  } catch {
    return null;
  }
}

/** user + system CPU seconds of a live process (all its threads) so far; null when it is gone */
export function procCpuSeconds(pid: number): number | null {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // fields after the command name (which may hold spaces) start at field 3 (state)
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK; // utime, stime: fields 14, 15
  } catch {
    return null;
  }
}

const started = new Set<ChildProcess>();
process.once('exit', () => {
  for (const c of started) if (c.exitCode === null && c.pid) c.kill('SIGKILL');
});

export interface Server {
  readonly name: string;
  readonly pid: number;
  /** the NBD URI of the export under test */
  readonly uri: string;
  stop(): Promise<void>;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** wall seconds from spawn to exit */
  seconds: number;
}

/** Run a command to completion, timing it with hrtime from spawn to exit. */
export function run(cmd: string, args: readonly string[], env: Readonly<Record<string, string>>, opts: { cwd?: string } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = spawn(cmd, args, { cwd: opts.cwd ?? REPO_ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      resolve({ code, signal, stdout, stderr, seconds });
    });
  });
}

/** run, and reject unless it exits with 0 */
export async function runOk(cmd: string, args: readonly string[], env: Readonly<Record<string, string>>): Promise<RunResult> {
  const r = await run(cmd, args, env);
  if (r.code !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} exited with ${r.signal ?? r.code}: ${(r.stderr || r.stdout).trim().slice(-2000)}`);
  }
  return r;
}

/** a long-running process; resolves once `ready()` says so (polled), rejects if it exits first */
async function startProcess(name: string, cmd: string, args: readonly string[], env: Readonly<Record<string, string>>,
  ready: () => Promise<boolean>, timeoutMs = 30_000): Promise<{ child: ChildProcess; stderr: () => string }> {
  const child = spawn(cmd, args, { cwd: REPO_ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
  started.add(child);
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    stderr += d;
    if (stderr.length > 64_000) stderr = stderr.slice(-32_000);
  });
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      started.delete(child);
      throw new Error(`${name} exited with ${child.signalCode ?? child.exitCode} while starting: ${stderr.trim()}`);
    }
    if (await ready()) return { child, stderr: () => stderr };
    if (Date.now() > deadline) {
      await stopProcess(child);
      throw new Error(`${name} did not get ready within ${timeoutMs} ms: ${stderr.trim()}`);
    }
    await sleep(20);
  }
}

/** SIGTERM (then SIGKILL after `graceMs`) the process by its pid and wait for it to exit */
async function stopProcess(child: ChildProcess, graceMs = 60_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    started.delete(child);
    return;
  }
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(timer);
  started.delete(child);
}

/** true once an NBD client completes the handshake with `uri` */
async function nbdReady(uri: string): Promise<boolean> {
  const r = await run('nbdinfo', ['--size', uri], {});
  return r.code === 0;
}

export function unixUri(socket: string, exportName = ''): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socket}`;
}

let serial = 0;

/**
 * The dmkit daemon in the foreground (`node bin/dmkit.js daemon --foreground`, which runs the
 * TypeScript sources through tsx), with private runtime/state dirs under `dir`, and one
 * device `name` created from `table` with the CLI. Stopping it flushes its devices (the
 * daemon's shutdown path), untimed.
 */
export async function startDmkit(dir: string, name: string, table: string, env: Readonly<Record<string, string>>): Promise<Server> {
  const base = path.join(dir, `dmkit-${++serial}`);
  const dmEnv = { ...env, DMKIT_RUNTIME_DIR: path.join(base, 'run'), DMKIT_STATE_DIR: path.join(base, 'state') };
  const bin = path.join(REPO_ROOT, 'bin/dmkit.js');
  const socket = path.join(base, 'run', 'nbd.sock');
  const control = path.join(base, 'run', 'control.sock');
  const { child, stderr } = await startProcess('dmkit daemon', process.execPath, [bin, 'daemon', '--foreground'], dmEnv,
    async () => fs.existsSync(control) && fs.existsSync(socket));
  try {
    await runOk(process.execPath, [bin, '--no-autostart', 'create', name, '--table', table], dmEnv);
    const uri = unixUri(socket, name);
    if (!(await nbdReady(uri))) throw new Error(`dmkit: export ${name} not reachable: ${stderr().trim()}`);
    return {
      name: 'dmkit', pid: child.pid!, uri,
      stop: async () => {
        await stopProcess(child);
        fs.rmSync(base, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await stopProcess(child);
    throw err;
  }
}

/** `nbdkit -f -U SOCK <plugin> <args…>` (nbdkit's defaults otherwise) */
export async function startNbdkit(dir: string, plugin: string, args: readonly string[], env: Readonly<Record<string, string>>): Promise<Server> {
  const socket = path.join(dir, `nbdkit-${++serial}.sock`);
  const uri = unixUri(socket);
  const { child } = await startProcess(`nbdkit ${plugin}`, 'nbdkit', ['-f', '-U', socket, plugin, ...args], env,
    async () => fs.existsSync(socket) && nbdReady(uri));
  return { name: `nbdkit ${plugin}`, pid: child.pid!, uri, stop: () => stopProcess(child) };
}

export interface FioJob {
  rw: 'read' | 'write' | 'randread' | 'randwrite';
  bs: number;
  iodepth: number;
}

export interface FioResult {
  ops: number;
  bytes: number;
  /** fio's own runtime of the job, seconds */
  seconds: number;
  /** mean completion latency, µs */
  clatMeanUs: number;
  /** fio's CPU use, percent of one CPU */
  fioCpuPercent: number;
}

/** fio's command line for one time-based job against an NBD URI */
export function fioArgs(uri: string, job: FioJob, seconds: number, seed: number, out: string): string[] {
  return [
    '--name=bench', '--ioengine=nbd', `--uri=${uri}`,
    `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.iodepth}`,
    '--time_based', `--runtime=${Math.max(1, Math.round(seconds * 1000))}ms`,
    '--invalidate=0', '--norandommap', `--randseed=${seed}`,
    '--output-format=json', `--output=${out}`,
  ];
}

/** one fio run (the JSON goes to a file: fio's nbd engine prints a line to stdout) */
export async function runFio(uri: string, job: FioJob, seconds: number, seed: number, dir: string,
  env: Readonly<Record<string, string>>): Promise<FioResult> {
  const out = path.join(dir, `fio-${process.pid}-${++serial}.json`);
  try {
    await runOk('fio', fioArgs(uri, job, seconds, seed, out), env);
    const j = (JSON.parse(fs.readFileSync(out, 'utf8')) as { jobs: FioJson[] }).jobs[0]!;
    if (j.error) throw new Error(`fio job error ${j.error}`);
    const d = job.rw.endsWith('read') ? j.read : j.write;
    if (!d.runtime) throw new Error('fio ran no I/O');
    return {
      ops: d.total_ios, bytes: d.io_bytes, seconds: d.runtime / 1000,
      clatMeanUs: d.clat_ns.mean / 1000, fioCpuPercent: j.usr_cpu + j.sys_cpu,
    };
  } finally {
    fs.rmSync(out, { force: true });
  }
}

interface FioJson {
  error: number;
  usr_cpu: number;
  sys_cpu: number;
  read: FioDir;
  write: FioDir;
}
interface FioDir {
  io_bytes: number;
  total_ios: number;
  /** ms */
  runtime: number;
  clat_ns: { mean: number };
}

/** fdatasync a file (untimed preparation: no writeback of an earlier run during the next) */
export function syncFile(file: string): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export function toolVersions(): Record<string, string> {
  const first = (cmd: string, args: string[]): string => {
    const r = spawnSync(cmd, args, { encoding: 'utf8' });
    return r.status === 0 ? r.stdout.split('\n')[0]!.trim() : 'unknown';
  };
  return { fio: first('fio', ['--version']), nbdkit: first('nbdkit', ['--version']), nbdcopy: first('nbdcopy', ['--version']), cp: first('cp', ['--version']) };
}

/**
 * Running the real NBD clients (libnbd's nbdinfo/nbdcopy/nbdsh, qemu-img/qemu-io, fio,
 * nbd-client) from tests, plus small file utilities. A missing tool is a test failure, not a
 * skip: install them with `apt-get install nbdkit libnbd-bin python3-libnbd qemu-utils fio nbd-client`.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { accessSync, constants, readFileSync, writeFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';

/** Debian's python3 first, for nbdsh (another python3 may come first on PATH) */
export const TOOL_PATH = ['/usr/bin', '/usr/sbin', '/sbin', process.env.PATH ?? ''].join(delimiter);

function findTool(name: string): string | undefined {
  for (const dir of TOOL_PATH.split(delimiter)) {
    if (!dir) continue;
    const p = join(dir, name);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return undefined;
}

/** throw (failing the test) unless every tool is installed */
export function requireTools(names: string[]): void {
  const missing = names.filter((n) => !findTool(n));
  if (missing.length > 0) {
    throw new Error(`missing NBD test tools: ${missing.join(', ')} (apt-get install nbdkit libnbd-bin python3-libnbd qemu-utils fio nbd-client)`);
  }
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** run a command; never rejects on a non-zero exit (the result says), only on spawn failure */
export function run(cmd: string, args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(
      cmd, args,
      {
        timeout: opts.timeoutMs ?? 30_000,
        maxBuffer: 64 * 1024 * 1024,
        env: { ...process.env, PATH: TOOL_PATH, LIBNBD_DEBUG: '0', ...opts.env },
      },
      (err, stdout, stderr) => {
        if (err && typeof (err as { code?: unknown }).code !== 'number') {
          if ((err as { killed?: boolean }).killed) {
            resolve({ code: -1, stdout: String(stdout), stderr: `${String(stderr)}\n(killed: timeout)` });
          } else reject(err);
          return;
        }
        resolve({ code: err ? Number((err as { code?: unknown }).code) : 0, stdout: String(stdout), stderr: String(stderr) });
      },
    );
  });
}

/** run and require exit 0, returning stdout */
export async function ok(cmd: string, args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<string> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}:\n${r.stderr}\n${r.stdout}`);
  return r.stdout;
}

/**
 * Run a Python snippet in nbdsh (extra `args`, e.g. --base-allocation) connected to `uri`
 * with strict mode off. The snippet may
 * call `t(name, fn)`, which records `name` → 'OK' or the libnbd errno name; the recorded
 * results are printed as JSON and returned.
 */
export async function nbdshResults(uri: string, args: string[], body: string): Promise<Record<string, string>> {
  const script = [
    'import json',
    'h.set_strict_mode(0)',
    'R = {}',
    'def t(name, fn):',
    '    try:',
    '        fn()',
    '        R[name] = "OK"',
    '    except nbd.Error as e:',
    '        R[name] = str(e.errno)',
    body,
    'print("RESULTS" + json.dumps(R))',
  ].join('\n');
  const out = await ok('nbdsh', [...args, '-u', uri, '-c', script]);
  const line = out.split('\n').find((l) => l.startsWith('RESULTS'));
  if (!line) throw new Error(`nbdsh printed no results:\n${out}`);
  return JSON.parse(line.slice('RESULTS'.length)) as Record<string, string>;
}

export function writeRandomImage(path: string, size: number): Buffer {
  const data = randomBytes(size);
  writeFileSync(path, data);
  return data;
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export function fileDigest(path: string): string {
  return sha256(readFileSync(path));
}

/** a deterministic PRNG (mulberry32) for fuzzing and patterns */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** URI for an export on a Unix socket */
export function unixUri(socket: string, name: string, tls?: { user: string; pskFile: string }): string {
  if (!tls) return `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`;
  return `nbds+unix://${tls.user}@/${encodeURIComponent(name)}?socket=${socket}&tls-psk-file=${tls.pskFile}`;
}

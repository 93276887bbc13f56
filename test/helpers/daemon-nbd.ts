/**
 * e2e helpers for the daemon's NBD export: the export's socket and URIs in a sandbox, a
 * long-lived nbdsh (libnbd's Python shell) driven line by line so a test can hold a
 * connection open, issue aio commands and poll them between CLI calls, peer NBD servers
 * (nbdkit, qemu-nbd) run as children, and an independent model of the `striped` mapping.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { createInterface } from 'node:readline';
import type { Sandbox } from './daemon.ts';
import { TOOL_PATH, unixUri } from './nbd-tools.ts';

/** the daemon's NBD socket in a sandbox */
export function nbdSock(sb: Sandbox): string {
  return path.join(sb.runtimeDir, 'nbd.sock');
}

/** `nbd+unix:///NAME?socket=<runtime>/nbd.sock` (or the nbds+unix form with a PSK) */
export function devUri(sb: Sandbox, name: string, tls?: { user: string; pskFile: string }): string {
  return unixUri(nbdSock(sb), name, tls);
}

/** processes started here, killed when the test worker exits whatever happens */
const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

function track(child: ChildProcess): void {
  children.add(child);
  child.on('exit', () => children.delete(child));
}

function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once('exit', () => resolve()));
}

// ---------------------------------------------------------------------------------------
// nbdsh session

/** one reply of the driver: the `result` variable as JSON, or the libnbd error */
export type NbdshReply<T = unknown> =
  | { ok: true; result: T }
  | { ok: false; errno: string | null; message: string };

/**
 * Runs inside `nbdsh -c`: reads one JSON-encoded Python snippet per line, runs it with
 * `h` (the handle), `nbd` and a persistent namespace, and prints one JSON reply per line.
 * A snippet returns a value by assigning `result`. libnbd errors come back with the errno
 * name (e.g. "EPERM"), or null when libnbd gave none (e.g. a closed connection).
 */
const DRIVER = String.raw`
import sys, json, errno as _errno, hashlib
ns = {'h': h, 'nbd': nbd, 'hashlib': hashlib}
def _name(n):
    # libnbd's Python binding gives the errno as a name ('EPERM') or a number, by version
    if isinstance(n, int): return _errno.errorcode.get(n, str(n)) if n else None
    return n or None
def _enc(o):
    if isinstance(o, (bytes, bytearray)): return o.hex()
    return repr(o)
for line in sys.stdin:
    ns['result'] = None
    try:
        exec(json.loads(line), ns)
        out = {'ok': True, 'result': ns.get('result')}
    except nbd.Error as e:
        out = {'ok': False, 'errno': _name(e.errno), 'message': str(e.string)}
    except Exception as e:
        out = {'ok': False, 'errno': None, 'message': repr(e)}
    sys.stdout.write(json.dumps(out, default=_enc) + '\n')
    sys.stdout.flush()
`;

/**
 * A long-lived nbdsh process. `run` sends a snippet and resolves with its reply, in order.
 * The handle is not connected until a snippet calls `h.connect_uri(...)`; `connect` does.
 * Strict mode is off unless `strict` is set, so requests the server did not advertise
 * are really sent (error cases).
 */
export class Nbdsh {
  readonly child: ChildProcess;
  readonly #waiting: Array<(line: string) => void> = [];
  #stderr = '';
  #exited = false;

  private constructor(child: ChildProcess) {
    this.child = child;
    createInterface({ input: child.stdout! }).on('line', (line) => this.#waiting.shift()?.(line));
    child.stderr!.on('data', (c: Buffer) => { this.#stderr += c.toString(); });
    child.stdin!.on('error', () => undefined);
    child.on('exit', () => {
      this.#exited = true;
      for (const w of this.#waiting.splice(0)) w(JSON.stringify({ ok: false, errno: null, message: `nbdsh exited: ${this.#stderr}` }));
    });
  }

  static async start(opts: { strict?: boolean } = {}): Promise<Nbdsh> {
    const child = spawn('nbdsh', ['-c', DRIVER], { env: { ...process.env, PATH: TOOL_PATH, LIBNBD_DEBUG: '0' }, stdio: ['pipe', 'pipe', 'pipe'] });
    track(child);
    const s = new Nbdsh(child);
    await new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', reject);
    });
    if (!opts.strict) await s.ok('h.set_strict_mode(0)');
    return s;
  }

  /** start and connect to `uri` */
  static async connect(uri: string, opts: { strict?: boolean } = {}): Promise<Nbdsh> {
    const s = await Nbdsh.start(opts);
    // as `nbdsh -u` does: the URI may name local files (tls-psk-file)
    await s.ok(`h.set_uri_allow_local_file(True); h.connect_uri(${JSON.stringify(uri)})`);
    return s;
  }

  run<T = unknown>(code: string): Promise<NbdshReply<T>> {
    if (this.#exited) return Promise.resolve({ ok: false, errno: null, message: `nbdsh exited: ${this.#stderr}` });
    const reply = new Promise<string>((resolve) => this.#waiting.push(resolve));
    this.child.stdin!.write(`${JSON.stringify(code)}\n`);
    return reply.then((l) => JSON.parse(l) as NbdshReply<T>);
  }

  /** run and require success; returns `result` */
  async ok<T = unknown>(code: string): Promise<T> {
    const r = await this.run<T>(code);
    if (!r.ok) throw new Error(`nbdsh: ${code}\n→ ${r.errno ?? ''} ${r.message}`);
    return r.result;
  }

  /** close stdin (nbdsh exits without DISC, as it does when a script ends) and wait */
  async close(): Promise<void> {
    this.child.stdin!.end();
    await exited(this.child);
  }

  kill(): void {
    this.child.kill('SIGKILL');
  }
}

// ---------------------------------------------------------------------------------------
// peer servers

export interface PeerServer {
  child: ChildProcess;
  socket: string;
  /** `nbd+unix:///NAME?socket=SOCKET` */
  uri(name?: string): string;
  stop(): Promise<void>;
}

function connectable(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socket);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/**
 * Start a server listening on the Unix socket `socket` (nbdkit -f -U, qemu-nbd -k) and
 * wait until it accepts connections.
 */
export async function peerServer(cmd: string, args: string[], socket: string, limitMs = 15_000): Promise<PeerServer> {
  const child = spawn(cmd, args, { env: { ...process.env, PATH: TOOL_PATH }, stdio: ['ignore', 'ignore', 'pipe'] });
  track(child);
  let stderr = '';
  child.stderr!.on('data', (c: Buffer) => { stderr += c.toString(); });
  for (const end = Date.now() + limitMs; ; ) {
    if (child.exitCode !== null) throw new Error(`${cmd} ${args.join(' ')} exited ${child.exitCode}: ${stderr}`);
    if (fs.existsSync(socket) && (await connectable(socket))) break;
    if (Date.now() > end) {
      child.kill('SIGKILL');
      throw new Error(`${cmd} did not listen on ${socket} within ${limitMs} ms: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    child, socket,
    uri: (name = '') => unixUri(socket, name),
    stop: async () => {
      child.kill('SIGTERM');
      await exited(child);
    },
  };
}

// ---------------------------------------------------------------------------------------
// striping model

/**
 * Where `striped <n> <chunk>` puts a target sector, worked out here without the engine:
 * chunk c = ⌊s/chunk⌋ goes to stripe c mod n, at that stripe's chunk ⌊c/n⌋.
 */
export function stripePlace(sector: number, stripes: number, chunk: number): { stripe: number; sector: number } {
  const c = Math.floor(sector / chunk);
  return { stripe: c % stripes, sector: Math.floor(c / stripes) * chunk + (sector % chunk) };
}

/**
 * Scatter `data` (written at target sector `start` of a striped target) into per-stripe
 * images (each starting at the stripe's offset 0), as the expected backing files.
 */
export function scatterStripes(images: Buffer[], chunk: number, start: number, data: Buffer): void {
  for (let i = 0; i < data.length / 512; i++) {
    const p = stripePlace(start + i, images.length, chunk);
    data.copy(images[p.stripe]!, p.sector * 512, i * 512, i * 512 + 512);
  }
}

/** a sparse file of `bytes` (all zeroes, no blocks allocated) */
export function sparseFile(file: string, bytes: number): string {
  fs.closeSync(fs.openSync(file, 'w'));
  fs.truncateSync(file, bytes);
  return file;
}

/** the first differing 512-byte sector of two buffers, or -1 (for readable failures) */
export function firstDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let s = 0; s < a.length; s += 512) {
    if (a.compare(b, s, s + 512, s, s + 512) !== 0) return s / 512;
  }
  return -1;
}

// ---------------------------------------------------------------------------------------
// a client process whose output is followed line by line

export interface Streaming {
  child: ChildProcess;
  /** stdout lines so far */
  lines: string[];
  /** resolves once `pred(lines)` holds (rejects if the process exits first) */
  until(pred: (lines: string[]) => boolean): Promise<void>;
  done: Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>;
}

/** Start a tool (on the NBD tools' PATH) and follow its stdout line by line. */
export function streaming(cmd: string, args: string[]): Streaming {
  const child = spawn(cmd, args, { env: { ...process.env, PATH: TOOL_PATH, LIBNBD_DEBUG: '0' }, stdio: ['ignore', 'pipe', 'pipe'] });
  track(child);
  const lines: string[] = [];
  const waiters = new Set<() => void>();
  let stderr = '';
  child.stderr!.on('data', (c: Buffer) => { stderr += c.toString(); });
  createInterface({ input: child.stdout! }).on('line', (l) => {
    lines.push(l);
    for (const w of waiters) w();
  });
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve) => {
    child.on('close', (code, signal) => resolve({ code, signal, stderr }));
  });
  const until = (pred: (l: string[]) => boolean): Promise<void> => new Promise((resolve, reject) => {
    if (pred(lines)) return resolve();
    const check = (): void => {
      if (!pred(lines)) return;
      waiters.delete(check);
      resolve();
    };
    waiters.add(check);
    void done.then((r) => {
      if (!waiters.has(check)) return;
      waiters.delete(check);
      reject(new Error(`${cmd} exited (${r.code ?? r.signal}) first; stdout: ${lines.join('\n')}\nstderr: ${r.stderr}`));
    });
  });
  return { child, lines, until, done };
}

/**
 * Running a howto as written (docs/howto/*.md): its ```sh blocks, in order, in one bash
 * (`-e`: a failing command fails the test), each block sourced from a file with stdin at
 * /dev/null; `run` resolves with what the block printed.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { ROOT, sandbox, type Sandbox } from './daemon.ts';
import { TOOL_PATH } from './nbd-tools.ts';

const BLOCK_MS = 120_000;

/** the ```sh blocks of a markdown file, in order */
export function shellBlocks(md: string): string[] {
  return [...md.matchAll(/^```sh\n([\s\S]*?)^```$/gm)].map((m) => m[1]!);
}

export interface Output {
  stdout: string;
  stderr: string;
}

/** One bash for the whole howto; each block is sourced from a file (stdin stays /dev/null for its commands). */
export class Shell {
  readonly #child: ChildProcess;
  readonly #dir: string;
  #out = '';
  #err = '';
  #n = 0;
  #exit: Promise<number | null>;

  constructor(dir: string, env: NodeJS.ProcessEnv) {
    this.#dir = dir;
    this.#child = spawn('bash', ['--noprofile', '--norc', '-e'], { cwd: dir, env, stdio: ['pipe', 'pipe', 'pipe'], detached: true });
    this.#child.stdout!.on('data', (d: Buffer) => (this.#out += d.toString()));
    this.#child.stderr!.on('data', (d: Buffer) => (this.#err += d.toString()));
    this.#exit = new Promise((resolve) => this.#child.on('exit', (code) => resolve(code)));
  }

  /** run one block; resolves with what it printed, rejects if it failed or hung */
  async run(block: string): Promise<Output> {
    const n = ++this.#n;
    const file = path.join(this.#dir, `howto-block-${n}.sh`);
    fs.writeFileSync(file, block);
    const mark = `@@howto-block-${n}-done@@`;
    const outStart = this.#out.length;
    const errStart = this.#err.length;
    this.#child.stdin!.write(`source '${file}' < /dev/null\necho '${mark}'; echo '${mark}' >&2\n`);
    const done = (): boolean => this.#out.includes(`${mark}\n`, outStart) && this.#err.includes(`${mark}\n`, errStart);
    const what = (): string => `block ${n}:\n${block}\nstdout: ${this.#out.slice(outStart)}\nstderr: ${this.#err.slice(errStart)}`;
    const end = Date.now() + BLOCK_MS;
    let exited: number | null | undefined;
    void this.#exit.then((code) => (exited = code));
    while (!done()) {
      if (exited !== undefined) throw new Error(`the shell exited (${exited}) in ${what()}`);
      if (Date.now() > end) throw new Error(`timed out after ${BLOCK_MS} ms in ${what()}`);
      await new Promise((r) => setTimeout(r, 25));
    }
    return {
      stdout: this.#out.slice(outStart, this.#out.indexOf(`${mark}\n`, outStart)),
      stderr: this.#err.slice(errStart, this.#err.indexOf(`${mark}\n`, errStart)),
    };
  }

  async close(): Promise<void> {
    if (this.#child.exitCode !== null || this.#child.signalCode !== null) return;
    this.#child.stdin!.end('exit 0\n');
    const timer = setTimeout(() => process.kill(-this.#child.pid!, 'SIGKILL'), 5000);
    await this.#exit;
    clearTimeout(timer);
  }
}

/** a TCP port free on 127.0.0.1 now */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}


/**
 * A sandbox for a howto that works in `${TMPDIR}/<dirName>` with a daemon of its own
 * (`$D/run`, `$D/state`: `sb` points there, for `daemonPid` and `cleanup`), `dmkit` on
 * PATH (bin/dmkit.js), and the bash that runs its blocks (`env` added to its environment).
 */
export function openHowto(dirName: string, env: NodeJS.ProcessEnv = {}): { sb: Sandbox; D: string; shell: Shell } {
  const sb = sandbox();
  const D = path.join(sb.dir, dirName);
  Object.assign(sb, {
    runtimeDir: path.join(D, 'run'),
    stateDir: path.join(D, 'state'),
    socket: path.join(D, 'run', 'control.sock'),
    pidFile: path.join(D, 'run', 'daemon.pid'),
    stateFile: path.join(D, 'state', 'devices.json'),
  });
  const bin = path.join(sb.dir, 'bin');
  fs.mkdirSync(bin);
  fs.writeFileSync(path.join(bin, 'dmkit'), `#!/bin/sh\nexec '${process.execPath}' '${path.join(ROOT, 'bin', 'dmkit.js')}' "$@"\n`, { mode: 0o755 });
  const all: NodeJS.ProcessEnv = { ...sb.env, TMPDIR: sb.dir, PATH: `${bin}${path.delimiter}${TOOL_PATH}`, ...env };
  delete all.DMKIT_RUNTIME_DIR;
  delete all.DMKIT_STATE_DIR;
  delete all.XDG_RUNTIME_DIR;
  return { sb, D, shell: new Shell(sb.dir, all) };
}

/**
 * A second site for network replication tests: a real `dmkit daemon --foreground` in a
 * sandbox of its own, receiving replication (`--replication-listen 127.0.0.1:PORT
 * --replication-secret FILE`). It can be SIGKILLed and restarted on the same port (it
 * restores its devices from its state dir, and its stream positions with them).
 *
 *   const site = await SiteDaemon.start();
 *   await site.request('create', { name: 'site0', table: `0 4096 linear ${img} 0` });
 *   // sender's slink: tcp 4 1 async peer=${site.address} secret=${site.secretFile}
 *   await site.kill(); await site.restart();
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ControlClient } from '../../src/daemon/client.ts';
import type { HelloResult } from '../../src/daemon/protocol.ts';
import { cleanup, ROOT, sandbox, type Sandbox } from './daemon.ts';

const CLI = path.join(ROOT, 'bin', 'dmkit.js');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** a fresh secret file of mode 0600 in `dir` */
export function writeSecret(dir: string, name = 'site.key'): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, crypto.randomBytes(32).toString('hex') + '\n', { mode: 0o600 });
  return file;
}

export interface SiteOptions {
  /** the shared secret file (default: a new one in the sandbox) */
  secretFile?: string;
  /** more daemon arguments (`--replication-tls require`) */
  args?: string[];
}

export class SiteDaemon {
  readonly sb: Sandbox;
  readonly secretFile: string;
  port = 0;
  readonly #args: string[];
  #child: ChildProcess | null = null;
  #ctl: ControlClient | null = null;

  private constructor(sb: Sandbox, secretFile: string, args: string[]) {
    this.sb = sb;
    this.secretFile = secretFile;
    this.#args = args;
  }

  static async start(opts: SiteOptions = {}): Promise<SiteDaemon> {
    const sb = sandbox();
    const site = new SiteDaemon(sb, opts.secretFile ?? writeSecret(sb.dir), opts.args ?? []);
    await site.restart();
    return site;
  }

  /** HOST:PORT of the receiver, for `peer=` */
  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  file(name: string): string {
    return path.join(this.sb.dir, name);
  }

  /** start the daemon (on the port it had, or a free one the first time) and wait until it answers */
  async restart(limitMs = 60_000): Promise<void> {
    const logFd = fs.openSync(this.file('daemon.log'), 'a');
    const args = [CLI, 'daemon', '--foreground', '--replication-listen', `127.0.0.1:${this.port}`, '--replication-secret', this.secretFile, ...this.#args];
    const child = spawn(process.execPath, args, { cwd: ROOT, env: this.sb.env, stdio: ['ignore', logFd, logFd] });
    fs.closeSync(logFd);
    this.#child = child;
    for (const end = Date.now() + limitMs; ; await sleep(20)) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`site daemon exited (${child.exitCode ?? child.signalCode}): ${this.logTail()}`);
      if (Date.now() > end) throw new Error(`site daemon not up within ${limitMs} ms: ${this.logTail()}`);
      try {
        const c = await ControlClient.connect(this.sb.socket);
        const h = await c.request<HelloResult>('hello');
        if (!h.replicationTcp) throw new Error('the site daemon does not receive replication');
        this.port = h.replicationTcp.port;
        this.#ctl = c;
        return;
      } catch (err) {
        if ((err as Error).message.includes('does not receive')) throw err;
      }
    }
  }

  request<T = unknown>(op: string, args: Record<string, unknown> = {}): Promise<T> {
    if (!this.#ctl) return Promise.reject(new Error('site daemon is not running'));
    return this.#ctl.request<T>(op, args);
  }

  /** SIGKILL (default), or another signal (SIGTERM: a clean stop), and wait until the daemon is gone */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = this.#child;
    this.#ctl?.close();
    this.#ctl = null;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const gone = new Promise<void>((r) => child.once('exit', () => r()));
    child.kill(signal);
    await gone;
  }

  logTail(bytes = 3000): string {
    try {
      return fs.readFileSync(this.file('daemon.log'), 'utf8').slice(-bytes);
    } catch {
      return '(no log)';
    }
  }

  log(): string {
    return this.logTail(1 << 20);
  }

  async close(): Promise<void> {
    this.#ctl?.close();
    this.#ctl = null;
    await cleanup(this.sb);
  }
}

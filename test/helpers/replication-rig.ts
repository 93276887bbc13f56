/**
 * The rig of the replication SIGKILL rounds (replication-rounds.ts): a real daemon in a
 * sandbox, started in the foreground by the rig so it can be SIGKILLed and restarted fast
 * (it restores its devices from its state dir), and a group of devices:
 *
 *   repl     replicator: ringbuffer over an image file, blockdev slinks 0 and 1 (async)
 *   siteN    the remote device: linear over remoteN.img, or `delay` for a slow site
 *   volN     replicator-dev: localN.img on slink 0; dm:siteN with a `disk` dirty log on slink 1
 *
 * The dirty logs are written clean by the rig in the kernel format (docs/dirty-logs.md)
 * and named in the table with no sync option, so a restart keeps what they record
 * (`nosync` in a table starts a new, all-clean log at every restore). The writer child
 * (repl-writer.ts) lives as long as the rig.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ControlClient } from '../../src/daemon/client.ts';
import { cleanup, isAlive, ROOT, sandbox, sandboxDaemon, waitGone, type Sandbox } from './daemon.ts';
import { ReplWriter } from './repl-writer.ts';

const CLI = path.join(ROOT, 'bin', 'dmkit.js');
export const SECTOR = 512;

export interface RigOptions {
  devices: number;
  devBytes: number;
  regionSectors: number;
  ringSectors: number;
  /** the largest write of a round, in 4 KiB blocks (default 4) */
  maxBlocks?: number;
  /** progress lines */
  log?: (line: string) => void;
  /**
   * Slink 1 through another transport: called once the rig's images exist, it sets up the
   * site (e.g. a receiving daemon with devices `siteN` over the rig's `remoteN.img`) and
   * says how slink 1 reaches it. Default: `blockdev` to `dm:siteN` in the rig's own daemon.
   */
  remote?: (rig: Rig) => Promise<RemoteSite>;
}

/** how slink 1 reaches a site the rig does not host */
export interface RemoteSite {
  /** slink type and its words after the slink number: `['tcp', 'async', 'retest=1', 'peer=…', 'secret=…']` */
  readonly slink: readonly string[];
  /** the replicator-dev's `<dev_param>` of device i (`site0`) */
  devParam(i: number): string;
}

export const DEFAULT_RIG: RigOptions = { devices: 3, devBytes: 2 << 20, regionSectors: 64, ringSectors: 8192 };

/**
 * Big writes (`npm run soak -- --big`): writes of 4 KiB to 256 KiB in 256 KiB regions, so most
 * log entries are over 64 KiB, the size whose memory the replication log reuses once no ship
 * reads it (docs/formats/replog.md, "Reused images"): the rounds then check that reuse at
 * every kill and cut.
 */
export const BIG_WRITES: Partial<RigOptions> = { regionSectors: 512, maxBlocks: 64 };

/** the writer's hot area: 16 blocks, or four of the largest writes */
export function hotBlocks(opts: RigOptions): number {
  return Math.max(16, 4 * (opts.maxBlocks ?? 4));
}

/** a status line with the target's JSON detail (the parts the rounds read) */
export interface Status {
  params: string;
  detail: {
    statistics?: { overflows: number };
    sites: Array<{
      slink: number; stateChar: string; mode?: string; consistent?: boolean; resyncedBytes?: number;
      link?: { connection: string; resends: number; badReplies: number; peerErrors: number; reconnects: number; lastError: string | null } | null;
    }>;
  };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class Rig {
  readonly sb: Sandbox;
  readonly opts: RigOptions;
  readonly writer = new ReplWriter();
  /** the rig can go on (false after a failed round: close it, which keeps the sandbox, and open a new one) */
  healthy = true;
  /** each device's content before the next round (local = remote) */
  initial: Buffer[];
  #daemon: ChildProcess | null = null;
  #ctl: ControlClient | null = null;
  #siteDelay = 0;

  private constructor(sb: Sandbox, opts: RigOptions) {
    this.sb = sb;
    this.opts = opts;
    this.initial = Array.from({ length: opts.devices }, () => Buffer.alloc(opts.devBytes));
  }

  static async open(opts: RigOptions): Promise<Rig> {
    const rig = new Rig(sandbox(), opts);
    try {
      await rig.#build();
    } catch (err) {
      rig.healthy = false;
      await rig.close();
      throw new Error(`replication rig in ${rig.sb.dir}: ${(err as Error).message}`, { cause: err });
    }
    return rig;
  }

  file(name: string): string {
    return path.join(this.sb.dir, name);
  }

  get sectors(): number {
    return this.opts.devBytes / SECTOR;
  }

  uris(): string[] {
    const sock = path.join(this.sb.runtimeDir, 'nbd.sock');
    return Array.from({ length: this.opts.devices }, (_, i) => `nbd+unix:///vol${i}?socket=${sock}`);
  }

  images(which: 'local' | 'remote'): Buffer[] {
    return Array.from({ length: this.opts.devices }, (_, i) => fs.readFileSync(this.file(`${which}${i}.img`)));
  }

  async #build(): Promise<void> {
    const { devices, devBytes, ringSectors, regionSectors } = this.opts;
    const sparse = (name: string, bytes: number): void => {
      fs.writeFileSync(this.file(name), '');
      fs.truncateSync(this.file(name), bytes);
    };
    sparse('rlog', (ringSectors + 64) * SECTOR);
    for (let i = 0; i < devices; i++) {
      sparse(`local${i}.img`, devBytes);
      sparse(`remote${i}.img`, devBytes);
      fs.writeFileSync(this.file(`dlog${i}`), cleanDiskLog(Math.ceil(devBytes / SECTOR / regionSectors)));
    }
    const remote = this.opts.remote ? await this.opts.remote(this) : null;
    await this.startDaemon();
    if (!remote) for (let i = 0; i < devices; i++) await this.#req('create', { name: `site${i}`, table: this.#siteTable(i, 0) });
    const [type, ...words] = remote?.slink ?? ['blockdev', 'async', 'retest=1'];
    await this.#req('create', { name: 'repl', table: `0 1 replicator ringbuffer 4 ${this.file('rlog')} 0 auto ${ringSectors} blockdev 1 0 ${type} ${words.length + 1} 1 ${words.join(' ')}` });
    for (let i = 0; i < devices; i++) {
      const dev = remote ? remote.devParam(i) : `dm:site${i}`;
      const table = `0 ${this.sectors} replicator-dev dm:repl ${i} 0 1 ${this.file(`local${i}.img`)} nolog 0 1 1 ${dev} disk 2 ${this.file(`dlog${i}`)} ${regionSectors}`;
      await this.#req('create', { name: `vol${i}`, table });
    }
  }

  #siteTable(i: number, delayMs: number): string {
    const img = this.file(`remote${i}.img`);
    return delayMs > 0 ? `0 ${this.sectors} delay ${img} 0 0 ${img} 0 ${delayMs}` : `0 ${this.sectors} linear ${img} 0`;
  }

  #req<T = unknown>(op: string, args: Record<string, unknown>): Promise<T> {
    if (!this.#ctl) throw new Error('no daemon');
    return this.#ctl.request<T>(op, args);
  }

  async status(name: string): Promise<Status> {
    const r = await this.#req<{ lines: Status[] }>('status', { name });
    return r.lines[0]!;
  }

  /** a message to the replicator: `slink suspend 1`, `policy 1 sync`, … */
  async message(...args: string[]): Promise<void> {
    await this.#req('message', { name: 'repl', sector: 0, args });
  }

  /** writes at the site take `ms` (0: a linear table again) */
  async setSiteDelay(ms: number): Promise<void> {
    if (ms === this.#siteDelay) return;
    for (let i = 0; i < this.opts.devices; i++) {
      await this.#req('load', { name: `site${i}`, table: this.#siteTable(i, ms) });
      await this.#req('resume', { name: `site${i}` });
    }
    this.#siteDelay = ms;
  }

  // ---- the daemon ----

  /** start the daemon in the foreground (its output appended to daemon.log); does not wait */
  spawnDaemon(): void {
    const logFd = fs.openSync(this.file('daemon.log'), 'a');
    this.#daemon = spawn(process.execPath, [CLI, 'daemon', '--foreground'], { cwd: ROOT, env: this.sb.env, stdio: ['ignore', logFd, logFd] });
    fs.closeSync(logFd);
  }

  /** start the daemon and wait until it answers (it listens once its devices are restored) */
  async startDaemon(limitMs = 60_000): Promise<void> {
    this.spawnDaemon();
    const child = this.#daemon!;
    for (const end = Date.now() + limitMs; ; await sleep(20)) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`daemon exited (${child.exitCode ?? child.signalCode}); log: ${this.logTail()}`);
      if (Date.now() > end) throw new Error(`daemon not up within ${limitMs} ms; log: ${this.logTail()}`);
      try {
        const c = await ControlClient.connect(this.sb.socket);
        await c.request('list');
        this.#ctl = c;
        return;
      } catch {
        // not listening yet
      }
    }
  }

  logSize(): number {
    return fs.statSync(this.file('daemon.log')).size;
  }

  logTail(bytes = 3000): string {
    try {
      return fs.readFileSync(this.file('daemon.log'), 'utf8').slice(-bytes);
    } catch {
      return '(no log)';
    }
  }

  async kill(): Promise<void> {
    const pid = sandboxDaemon(this.sb);
    if (!pid) throw new Error(`no daemon to kill; log: ${this.logTail()}`);
    process.kill(pid, 'SIGKILL');
    this.#ctl?.close();
    this.#ctl = null;
    await waitGone(pid);
  }

  /** SIGKILL the daemon spawned last, `afterMs` after its log (from byte `logFrom`) says it recovered the ring or listens */
  async killDuringRecovery(logFrom: number, afterMs: number, limitMs = 30_000): Promise<void> {
    for (const end = Date.now() + limitMs; Date.now() < end; await sleep(5)) {
      const text = fs.readFileSync(this.file('daemon.log'), 'utf8').slice(logFrom);
      if (/recovered \d+ log entries|listening on/.test(text)) break;
    }
    await sleep(afterMs);
    const child = this.#daemon!;
    const gone = new Promise<void>((r) => (child.exitCode !== null || child.signalCode !== null ? r() : child.once('exit', () => r())));
    child.kill('SIGKILL');
    await gone;
  }

  /** caught up: slink 1 in order and consistent with nothing outstanding, every region of every device in sync */
  async caughtUp(limitMs = 60_000): Promise<Status> {
    for (const end = Date.now() + limitMs; ; await sleep(20)) {
      const s = await this.status('repl');
      if (/(^| )1:[AS],0,0( |$)/.test(s.params) && s.detail.sites.find((x) => x.slink === 1)?.consistent === true) {
        let all = true;
        for (let i = 0; i < this.opts.devices && all; i++) {
          const m = /^A,1\/1 A,(\d+)\/(\d+)$/.exec((await this.status(`vol${i}`)).params);
          all = !!m && m[1] === m[2];
        }
        if (all) return s;
      }
      if (Date.now() > end) throw new Error(`slink 1 not caught up within ${limitMs} ms: repl ${s.params}; ${await this.inSync()}`);
    }
  }

  /** every replicator-dev's info line */
  async inSync(): Promise<string> {
    const parts: string[] = [];
    for (let i = 0; i < this.opts.devices; i++) parts.push((await this.status(`vol${i}`)).params);
    return parts.join(' | ');
  }

  /** stop everything; the sandbox is deleted when the rig is healthy, else kept (with its daemon stopped) */
  async close(): Promise<void> {
    await this.writer.close();
    this.#ctl?.close();
    this.#ctl = null;
    if (this.healthy) {
      await cleanup(this.sb);
      return;
    }
    const pid = sandboxDaemon(this.sb);
    if (!pid) return;
    process.kill(pid, 'SIGTERM');
    await waitGone(pid, 15_000).catch(() => isAlive(pid) && process.kill(pid, 'SIGKILL'));
  }
}

/** a kernel-format (dm-log) disk dirty log with every region clean */
function cleanDiskLog(regions: number): Buffer {
  const bytes = Math.ceil((1024 + Math.ceil(regions / 64) * 8) / SECTOR) * SECTOR;
  const buf = Buffer.alloc(bytes);
  buf.writeUInt32LE(0x4d695272, 0);
  buf.writeUInt32LE(2, 4);
  buf.writeBigUInt64LE(BigInt(regions), 8);
  for (let i = 0; i < regions; i++) buf[1024 + (i >> 3)]! |= 1 << (i & 7);
  return buf;
}

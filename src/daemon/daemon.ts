/**
 * The daemon: one engine, its persisted device set, the control socket, and extension
 * points (the NBD export plugs in here). `startDaemon` runs it in the calling process;
 * `tools/dmkit.ts daemon` is the command-line entry.
 *
 * Start: private runtime/state dirs → single-instance lock → plugins → extensions' init →
 * restore the device set → extensions' start → pid file → control socket.
 * Stop: close the socket → stop extensions → save the state and stop following changes →
 * flush every device that can be flushed without waiting on a suspended one → close the
 * engine → remove socket and pid file.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import fsx from 'fs-ext';
import { closeDigestPool } from '../core/digest.ts';
import { DmError } from '../core/errors.ts';
import { log, type Logger } from '../core/log.ts';
import { DeviceMapper, VERSION } from '../index.ts';
import { ensurePrivateDir, runtimePaths, stateFile, type RuntimePaths } from './paths.ts';
import { PROTOCOL_VERSION, type HelloResult } from './protocol.ts';
import { ControlServer } from './server.ts';
import { nbdExtension } from './nbd-wiring.ts';
import { replicationExtension } from './replication-wiring.ts';
import { httpExtension } from '../http/wiring.ts';
import type { ServerContext } from './server.ts';
import type { ReplicationReceiver } from '../replication/receiver.ts';
import { writeAtomic } from '../core/atomic-file.ts';
import { restore, StateStore } from './state.ts';

export interface DaemonOptions {
  runtimeDir: string;
  stateDir: string;
  /** `HOST:PORT` for the NBD listener (read by the NBD wiring extension) */
  nbdListen?: string;
  /** NBD connection threads (default: DMKIT_NBD_THREADS, else CPUs up to 4; docs/nbd.md) */
  nbdThreads?: number;
  /** TLS pre-shared key file for NBD */
  tlsPsk?: string;
  /** NBD TLS mode: `on` offers TLS, `require` refuses plain connections */
  tls?: 'on' | 'require';
  /** `HOST:PORT` where `tcp` slinks of other sites reach this daemon (src/replication/receiver.ts) */
  replicationListen?: string;
  /** the shared secret file of `--replication-listen` (mode 0600 or stricter) */
  replicationSecret?: string;
  /** `require`: refuse replication senders that do not use TLS */
  replicationTls?: 'require';
  /** TLS with certificates for replication senders that ask for it: CA, certificate, key (PEM) */
  replicationTlsCa?: string;
  replicationTlsCert?: string;
  replicationTlsKey?: string;
  /** `HOST:PORT` of the HTTP listener: /metrics and the status page (src/http/) */
  httpListen?: string;
  /** the token file whose contents allow changes over HTTP (mode 0600); without it HTTP is read-only */
  httpToken?: string;
  /** plugin modules (src/plugin.ts), loaded with dm.loadPlugin before the device set is restored */
  plugins?: string[];
  /** this process is the daemon: SIGTERM/SIGINT stop it and exit the process */
  foreground?: boolean;
  /** extensions to run; default: one from every registered factory */
  extensions?: DaemonExtension[];
}

/**
 * Something that runs with the daemon (e.g. the NBD server). `init` runs before the device
 * set is restored (register device resolvers there), `start` after it, before the control
 * socket accepts; `stop` runs in reverse order at shutdown, before devices are flushed.
 */
export interface DaemonExtension {
  readonly name: string;
  init?(d: Daemon): Promise<void> | void;
  start(d: Daemon): Promise<void>;
  stop(): Promise<void>;
}

export type ExtensionFactory = (opts: DaemonOptions) => DaemonExtension | null | undefined;
/** the NBD export runs with every daemon; the replication receiver and the HTTP listener when asked for */
const factories: ExtensionFactory[] = [nbdExtension, replicationExtension, httpExtension];

/** Register an extension factory; every daemon started afterwards asks it for an extension. */
export function registerDaemonExtension(factory: ExtensionFactory): void {
  factories.push(factory);
}

export class Daemon {
  readonly dm: DeviceMapper;
  readonly options: DaemonOptions;
  readonly runtimeDir: string;
  readonly stateDir: string;
  readonly paths: RuntimePaths;
  readonly extensions: DaemonExtension[];
  readonly state: StateStore;
  restoreErrors: Array<{ name: string; error: string }> = [];
  /** where the NBD export listens on TCP, set by the NBD extension (reported by `hello`) */
  nbdTcp: { host: string; port: number } | null = null;
  /** where the replication receiver listens, set by its extension (reported by `hello`) */
  replicationTcp: { host: string; port: number } | null = null;
  /** where the HTTP listener listens, set by its extension (reported by `hello`) */
  httpTcp: { host: string; port: number } | null = null;
  /** the replication receiver, when this daemon is a receiving site */
  receiver: ReplicationReceiver | null = null;
  readonly #log = log('daemon');
  #lockFd: number;
  #server: ControlServer | null = null;
  #started: DaemonExtension[] = [];
  #stopping: Promise<void> | null = null;

  constructor(opts: DaemonOptions, lockFd: number) {
    this.options = opts;
    this.runtimeDir = opts.runtimeDir;
    this.stateDir = opts.stateDir;
    this.paths = runtimePaths(opts.runtimeDir);
    this.#lockFd = lockFd;
    this.dm = new DeviceMapper({ stateDir: opts.stateDir });
    this.state = new StateStore(stateFile(opts.stateDir), this.dm, this.#log);
    this.extensions = opts.extensions ?? factories.map((f) => f(opts)).filter((e): e is DaemonExtension => !!e);
  }

  hello(): HelloResult {
    return {
      protocol: PROTOCOL_VERSION, version: VERSION, pid: process.pid,
      runtimeDir: this.runtimeDir, stateDir: this.stateDir, restoreErrors: this.restoreErrors, nbdTcp: this.nbdTcp,
      replicationTcp: this.replicationTcp, httpTcp: this.httpTcp,
    };
  }

  /** what ops run with (the control socket's and the HTTP listener's) */
  get opContext(): ServerContext {
    return { dm: this.dm, state: this.state, hello: () => this.hello(), receiver: () => this.receiver };
  }

  /** @internal the start sequence after the lock is held */
  async run(): Promise<void> {
    for (const p of this.options.plugins ?? []) {
      try {
        const names = await this.dm.loadPlugin(p);
        this.#log.info(`plugin ${p}: registered ${names.join(', ') || 'nothing'}`);
      } catch (err) {
        throw new DmError((err as DmError).code ?? 'EINVAL', `plugin ${p}: ${(err as Error).message}`);
      }
    }
    for (const e of this.extensions) await e.init?.(this);
    this.restoreErrors = await restore(this.dm, this.state, this.state.read(), this.#log);
    this.state.attach();
    this.state.markDirty();
    await this.state.save();
    for (const e of this.extensions) {
      await e.start(this);
      this.#started.push(e);
    }
    await writeAtomic(this.paths.pid, `${process.pid}\n`);
    this.#server = new ControlServer(this.paths.socket, this.opContext, this.#log);
    await this.#server.listen();
    this.#log.info(`dmkit ${VERSION} daemon (pid ${process.pid}) listening on ${this.paths.socket}, ${this.dm.list().length} device(s)`);
  }

  /** Orderly shutdown; safe to call more than once. */
  stop(): Promise<void> {
    this.#stopping ??= this.#stop();
    return this.#stopping;
  }

  async #stop(): Promise<void> {
    const step = async (what: string, f: () => Promise<unknown> | unknown): Promise<void> => {
      try {
        await f();
      } catch (err) {
        this.#log.error(`shutdown: ${what}: ${(err as Error).message}`);
      }
    };
    if (this.#server) await step('closing the control socket', () => this.#server!.close());
    for (const e of this.#started.reverse()) await step(`stopping ${e.name}`, () => e.stop());
    await step('saving state', () => this.state.save());
    this.state.detach();
    await step('closing devices', () => closeEngine(this.dm, this.#log));
    await step('stopping the digest threads', () => closeDigestPool());
    if (readPid(this.paths.pid) === process.pid) fs.rmSync(this.paths.pid, { force: true });
    await step('releasing the lock', () => fs.closeSync(this.#lockFd));
  }
}

function readPid(file: string): number | null {
  try {
    const n = Number(fs.readFileSync(file, 'utf8').trim());
    return Number.isSafeInteger(n) && n > 0 ? n : null;
  } catch {
    return null;
  }
}

function connectable(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection(socket);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

function alreadyRunning(paths: RuntimePaths): DmError {
  const pid = readPid(paths.pid);
  return new DmError('EEXIST', `a dmkit daemon is already running${pid ? ` (pid ${pid})` : ''} on ${paths.socket}`);
}

/** Take the single-instance lock, clear a stale socket. Returns the lock's fd. */
async function claimRuntime(paths: RuntimePaths): Promise<number> {
  const fd = fs.openSync(paths.lock, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
  try {
    fsx.flockSync(fd, 'exnb');
  } catch (err) {
    fs.closeSync(fd);
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EAGAIN' || code === 'EWOULDBLOCK') throw alreadyRunning(paths);
    throw err;
  }
  if (fs.existsSync(paths.socket)) {
    if (await connectable(paths.socket)) {
      fs.closeSync(fd);
      throw alreadyRunning(paths);
    }
    fs.rmSync(paths.socket, { force: true });
  }
  return fd;
}

/** Start a daemon in this process. Rejects (and leaves nothing running) if it cannot start. */
export async function startDaemon(options: DaemonOptions): Promise<Daemon> {
  const opts = { ...options, runtimeDir: path.resolve(options.runtimeDir), stateDir: path.resolve(options.stateDir) };
  ensurePrivateDir(opts.runtimeDir);
  ensurePrivateDir(opts.stateDir);
  const paths = runtimePaths(opts.runtimeDir);
  const lockFd = await claimRuntime(paths);
  let daemon: Daemon;
  try {
    daemon = new Daemon(opts, lockFd);
  } catch (err) {
    fs.closeSync(lockFd);
    throw err;
  }
  // a daemon process resolves relative references in tables from / (not from wherever it
  // happened to be started), so a restart finds the same files
  if (opts.foreground) process.chdir('/');
  try {
    await daemon.run();
  } catch (err) {
    await daemon.stop();
    throw err;
  }
  if (opts.foreground) handleSignals(daemon);
  return daemon;
}

function handleSignals(daemon: Daemon): void {
  const l = log('daemon');
  let signalled = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (signalled) {
      l.warn(`${sig} again: exiting without finishing shutdown`);
      process.exit(1);
    }
    signalled = true;
    l.info(`${sig}: shutting down`);
    daemon.stop().then(() => process.exit(0), (err: Error) => {
      l.error(`shutdown failed: ${err.message}`);
      process.exit(1);
    });
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  process.on('uncaughtException', (err) => l.error(`uncaught exception (daemon keeps running): ${err.stack ?? err.message}`));
  process.on('unhandledRejection', (err) => l.error(`unhandled rejection (daemon keeps running): ${(err as Error)?.stack ?? String(err)}`));
}

// ---------------------------------------------------------------------------------------
// Shutdown without hanging. A flush through a suspended device would wait for a resume that
// never comes. So: flush every device whose stack is free of suspended devices, tear down
// (top-down, without flush) every device that is suspended or sits on a suspended one (its
// queued I/O fails with ENXIO, as at remove), then let `dm.close()` flush and close the rest.

const FLUSH_TIMEOUT_MS = 30_000;

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_r, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms / 1000} s`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

async function closeEngine(dm: DeviceMapper, l: Logger): Promise<void> {
  for (const d of dm.list()) {
    if (!d.live || dm.onSuspended(d.name)) continue;
    await withTimeout(dm.flush(d.name), FLUSH_TIMEOUT_MS, `flush of ${d.name}`)
      .catch((err: Error) => l.error(`shutdown: ${d.name}: flush failed: ${err.message}`));
  }
  // the engine tears the suspended ones down itself (its queued I/O fails with ENXIO, as at
  // remove), knowing it is closing: a replicator-dev then stays in its group (its site keeps
  // its position in the log) instead of leaving it as at `dmkit remove`
  for (const d of dm.list()) {
    if (dm.onSuspended(d.name)) l.warn(`shutdown: ${d.name}: ${d.suspended ? 'suspended' : 'stacked on a suspended device'}; closing without flush`);
  }
  await withTimeout(dm.close(), FLUSH_TIMEOUT_MS, 'closing the engine');
}

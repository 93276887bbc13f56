/**
 * The command table: every dmkit verb with dmsetup's syntax, in one commander program.
 * Each verb connects to the daemon (starting it unless --no-autostart) and runs its action.
 */
import path from 'node:path';
import { Command, Option } from 'commander';
import { DmError } from '../../src/core/errors.ts';
import { runtimeDir, stateDir } from '../../src/daemon/paths.ts';
import { parseListen } from '../../src/daemon/listen.ts';
import * as A from './actions.ts';
import { events } from './events.ts';
import { connect, isRunning, paths, spawnDaemon } from './connect.ts';

type Opts = Record<string, unknown>;

const collect = (v: string, prev: string[]): string[] => [...prev, v];

/** wrap a verb: connect, run, close; exit status 1 if a per-device step failed */
function verb(f: (s: A.Session, ...args: never[]) => Promise<void>) {
  return async (...args: unknown[]): Promise<void> => {
    const cmd = args[args.length - 1] as Command;
    const client = await connect({ autostart: cmd.optsWithGlobals().autostart !== false });
    const s: A.Session = {
      client,
      out: (x) => void process.stdout.write(x),
      err: (x) => void process.stderr.write(x),
      failed: false,
    };
    try {
      await (f as (s: A.Session, ...a: unknown[]) => Promise<void>)(s, ...args.slice(0, -1));
    } finally {
      client.close();
    }
    if (s.failed) process.exitCode = 1;
  };
}

/** an optional file option as an absolute path (the daemon runs from /) */
function abs(v: unknown): string | undefined {
  return v === undefined ? undefined : path.resolve(v as string);
}

function checkListen(v: string, option = '--nbd-listen'): string {
  parseListen(v, option); // throws a precise EINVAL
  return v;
}

/** `--nbd-threads`: a whole number of connection threads, 0 (none) to NBD_THREADS_MAX */
const NBD_THREADS_MAX = 64;
function checkThreads(v: string): number {
  const n = /^\d+$/.test(v) ? Number(v) : NaN;
  if (!(n <= NBD_THREADS_MAX)) {
    throw new DmError('EINVAL', `--nbd-threads: expected a whole number of threads from 0 to ${NBD_THREADS_MAX}, got '${v}'`);
  }
  return n;
}

async function daemon(o: Opts): Promise<void> {
  const plugins = (o.plugin as string[]).map((p) => path.resolve(p));
  const nbdListen = o.nbdListen === undefined ? undefined : checkListen(o.nbdListen as string);
  const nbdThreads = o.nbdThreads === undefined ? undefined : checkThreads(o.nbdThreads as string);
  const replicationListen = o.replicationListen === undefined ? undefined : checkListen(o.replicationListen as string, '--replication-listen');
  const replicationSecret = o.replicationSecret === undefined ? undefined : path.resolve(o.replicationSecret as string);
  const httpListen = o.httpListen === undefined ? undefined : checkListen(o.httpListen as string, '--http-listen');
  const httpToken = abs(o.httpToken);
  if (o.foreground) {
    process.env.DMKIT_LOG ??= 'info';
    const { startDaemon } = await import('../../src/daemon/daemon.ts');
    await startDaemon({
      runtimeDir: runtimeDir(), stateDir: stateDir(), nbdListen, nbdThreads, plugins, foreground: true,
      tlsPsk: o.tlsPsk ? path.resolve(o.tlsPsk as string) : undefined, tls: o.tls as 'on' | 'require' | undefined,
      replicationListen, replicationSecret, replicationTls: o.replicationTls as 'require' | undefined,
      replicationTlsCa: abs(o.replicationTlsCa), replicationTlsCert: abs(o.replicationTlsCert), replicationTlsKey: abs(o.replicationTlsKey),
      httpListen, httpToken,
    });
    return;
  }
  const p = paths();
  if (await isRunning(p)) throw new DmError('EEXIST', `a dmkit daemon is already running on ${p.socket}`);
  const args: string[] = [];
  if (nbdListen) args.push('--nbd-listen', nbdListen);
  if (nbdThreads !== undefined) args.push('--nbd-threads', String(nbdThreads));
  if (o.tlsPsk) args.push('--tls-psk', path.resolve(o.tlsPsk as string));
  if (o.tls) args.push('--tls', o.tls as string);
  if (replicationListen) args.push('--replication-listen', replicationListen);
  if (replicationSecret) args.push('--replication-secret', replicationSecret);
  if (o.replicationTls) args.push('--replication-tls', o.replicationTls as string);
  for (const [flag, v] of [['--replication-tls-ca', o.replicationTlsCa], ['--replication-tls-cert', o.replicationTlsCert], ['--replication-tls-key', o.replicationTlsKey]] as const) {
    if (v !== undefined) args.push(flag, path.resolve(v as string));
  }
  if (httpListen) args.push('--http-listen', httpListen);
  if (httpToken) args.push('--http-token', httpToken);
  for (const pl of plugins) args.push('--plugin', pl);
  await spawnDaemon(p, args);
}

export function buildProgram(): Command {
  const program = new Command('dmkit')
    .description('user-space device-mapper: dmsetup\'s verbs against the dmkit daemon')
    .option('--no-autostart', 'fail instead of starting a daemon when none runs')
    .exitOverride()
    .configureOutput({ outputError: (str, write) => write(`dmkit: ${str.replace(/^error: /, '')}`) });

  program.command('create').description('create a device [with a table: create + load + resume]')
    .argument('<name>').argument('[table_file]')
    .option('--table <table>', 'the table text').option('-n, --notable', 'create without a table')
    .option('-u, --uuid <uuid>', 'device uuid').option('-r, --readonly', 'read-only device')
    .option('-v, --verbose', 'print the device info afterwards')
    .action(verb(A.create));
  program.command('load').alias('reload').description('load a table into the inactive slot')
    .argument('<name>').argument('[table_file]')
    .option('--table <table>', 'the table text').option('-n, --notable', '(refused: only for create)')
    .option('-r, --readonly', 'read-only table').option('-v, --verbose', 'print the device info afterwards')
    .action(verb(A.load));
  program.command('suspend').description('queue new I/O and drain in-flight I/O').argument('<dev...>')
    .option('--noflush', 'targets may hand back in-flight I/O').option('--nolockfs', 'accepted for dmsetup compatibility')
    .action(verb(A.simple('suspend', (o) => ({ noflush: !!o.noflush }))));
  program.command('resume').description('swap in the inactive table if any and re-issue queued I/O').argument('<dev...>')
    .action(verb(A.simple('resume')));
  program.command('promote').description('make a replication group primary (NAME: its replicator or a replicator-dev; docs/howto/failover.md)')
    .argument('<dev...>').option('--force', 'even while a connected primary sends to it, or while it is inconsistent')
    .action(verb(A.simple('promote', (o) => ({ force: !!o.force }))));
  program.command('demote').description('make a replication group secondary: the next primary to connect resyncs it')
    .argument('<dev...>').option('--discard-my-data', "resolve a split brain: this side's changes are overwritten")
    .action(verb(A.simple('demote', (o) => ({ discard: !!o.discardMyData }))));
  program.command('clear').description('drop the inactive table').argument('<dev...>')
    .action(verb(A.simple('clear')));
  program.command('remove').description('remove devices (EBUSY while open)').argument('<dev...>')
    .option('-f, --force', 'swap in an error table first').option('--retry', 'retry for a few seconds while busy')
    .option('--deferred', 'remove at last close')
    .action(verb(A.simple('remove', (o) => ({ force: !!o.force, retry: !!o.retry, deferred: !!o.deferred }))));
  program.command('remove_all').description('remove every closed device, repeating so stacks unwind')
    .option('-f, --force', 'swap error tables into devices still open').option('--deferred', 'defer removal of open devices')
    .action(verb(A.removeAll));
  program.command('rename').description('rename DEV NEW, or rename DEV --setuuid UUID')
    .argument('<dev>').argument('<new>', 'new name, or the uuid with --setuuid')
    .option('--setuuid', 'set the uuid (once) instead of the name')
    .action(verb(A.rename));
  for (const op of ['table', 'status'] as const) {
    const c = program.command(op).description(op === 'table' ? 'print tables' : 'print target status')
      .argument('[dev...]').option('--target <type>', 'only lines of this target type').option('--json', 'JSON output');
    if (op === 'table') c.option('--inactive', 'the inactive table');
    c.action(verb(A.tables(op)));
  }
  program.command('info').description('device information').argument('[dev...]')
    .option('-c, --columns', 'one line per device').option('-C', 'same as -c')
    .option('--noheadings', 'with -c: no heading line').option('--json', 'JSON output')
    .action(verb(A.info));
  program.command('ls').description('list devices')
    .option('--tree', 'show stacking').option('--target <type>', 'only devices with this target type')
    .option('--json', 'JSON output')
    .action(verb(A.ls));
  program.command('deps').description('the devices the live table uses').argument('[dev...]')
    .option('--inactive', 'of the inactive table').option('--json', 'JSON output')
    .action(verb(A.deps));
  program.command('targets').description('registered target types').option('--json', 'JSON output')
    .action(verb(A.targets));
  program.command('message').description('send a message to the target covering SECTOR')
    .argument('<dev>').argument('<sector>').argument('<message...>')
    .action(verb(A.message));
  program.command('wait').description('wait until the event counter differs from EVENT_NR (default 0)')
    .argument('<dev>').argument('[event_nr]')
    .option('--progress', 'show resync/verify progress until complete')
    .option('-v, --verbose', 'print the device info afterwards')
    .action(verb(A.wait));
  program.command('events').description('print the state of every device and replication site, then every change as it happens')
    .option('--json', 'one JSON object per line').option('--now', 'print the current state and exit')
    .action(verb(events));
  program.command('version').description('CLI and daemon versions').action(verb(A.version));

  const io = program.command('io').description('debugging: byte-level I/O through the daemon (offsets and lengths in bytes)');
  io.command('read').argument('<dev>').argument('<offset>').argument('<length>').description('read to stdout')
    .action(verb((s, dev: string, off: string, len: string, o: Opts) => A.io(s, 'read', dev, [off, len], o)));
  io.command('write').argument('<dev>').argument('<offset>').argument('[file]').description('write FILE or stdin')
    .option('--fua', 'durable before the reply')
    .action(verb((s, dev: string, off: string, file: string | undefined, o: Opts) => A.io(s, 'write', dev, file ? [off, file] : [off], o)));
  io.command('flush').argument('<dev>').description('flush the device')
    .action(verb((s, dev: string, o: Opts) => A.io(s, 'flush', dev, [], o)));

  program.command('daemon').description('run the daemon (in the background unless --foreground)')
    .option('--foreground', 'stay in the foreground, log to stderr')
    .option('--nbd-listen <host:port>', 'serve the devices over NBD on this address')
    .option('--nbd-threads <n>', 'threads serving NBD connections to linear-over-file devices (0: none; default: CPUs, at most 4)')
    .addOption(new Option('--tls <mode>', 'NBD TLS').choices(['on', 'require']))
    .option('--tls-psk <file>', 'NBD TLS pre-shared key file')
    .option('--replication-listen <host:port>', 'receive replication from tcp slinks of other sites on this address')
    .option('--replication-secret <file>', 'the shared secret senders must prove (mode 0600)')
    .addOption(new Option('--replication-tls <mode>', 'refuse replication senders without TLS').choices(['require']))
    .option('--replication-tls-ca <file>', 'CA (PEM) that signs the certificates of replication senders using tls-ca=')
    .option('--replication-tls-cert <file>', "this receiver's TLS certificate (PEM)")
    .option('--replication-tls-key <file>', "this receiver's TLS key (PEM, mode 0600)")
    .option('--http-listen <host:port>', 'serve /metrics (Prometheus) and the status page on this address (docs/metrics.md, docs/web.md)')
    .option('--http-token <file>', 'a secret (mode 0600) that allows changes over HTTP; without it HTTP is read-only')
    .option('--plugin <path>', 'load a plugin module: target types, dirty logs, slinks, replogs (repeatable)', collect, [])
    .action((o: Opts) => daemon(o));
  return program;
}

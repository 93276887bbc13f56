/**
 * An NBD client holds its device open under its own name: `dmkit remove` refuses with the
 * client in the message (`open count 1: exported over NBD as 'vol' to 127.0.0.1:41234`, or
 * `… to a client on <runtime>/nbd.sock`), the connections to one export counted in one entry
 * (`… to 3 clients: 127.0.0.1:41234, 2 clients on <runtime>/nbd.sock`), and every way a
 * connection ends releases its holder: NBD_CMD_DISC, the client closing its socket without
 * it, and the client killed with SIGKILL while requests are in flight. Each scenario runs on
 * a `linear` device over a file (its connections are served on connection threads) and on
 * a `zero` device (served on the main thread), with real nbdsh clients over the daemon's
 * Unix socket and over TCP.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import type { ControlClient } from '../../src/daemon/client.ts';
import type { DeviceSummary, HelloResult } from '../../src/daemon/protocol.ts';
import { cleanup, client, dmkit, ok as cli, sandbox, type Sandbox } from '../helpers/daemon.ts';
import { devUri, nbdSock, Nbdsh, sparseFile } from '../helpers/daemon-nbd.ts';
import { requireTools } from '../helpers/nbd-tools.ts';

const SECTORS = 16384; // 8 MiB

let sb: Sandbox;
let cl: ControlClient;
let port: number;
let sock: string;
const sessions: Nbdsh[] = [];

const TABLES: Array<[string, () => string]> = [
  ['linear over a file (connection threads)', () => `0 ${SECTORS} linear ${sparseFile(path.join(sb.dir, 'vol.img'), SECTORS * 512)} 0`],
  ['zero (main thread)', () => `0 ${SECTORS} zero`],
];

async function connect(over: 'unix' | 'tcp'): Promise<Nbdsh> {
  const s = await Nbdsh.connect(over === 'unix' ? devUri(sb, 'vol') : `nbd://127.0.0.1:${port}/vol`);
  sessions.push(s);
  await s.ok('h.pread(512, 0)'); // in transmission
  return s;
}

/** `dmkit remove vol`, which must be refused: its stderr */
async function refused(): Promise<string> {
  const r = await dmkit(sb, ['remove', 'vol']);
  expect(r, r.stderr).toMatchObject({ code: 1, stdout: '' });
  return r.stderr;
}

const busy = (count: number, holder: string): string => `dmkit: vol: device is busy (open count ${count}: ${holder})\n`;

/** poll (through the control socket) until vol's open count is `n`; bounded, not a timing assertion */
async function openCountIs(n: number): Promise<void> {
  let now = -1;
  for (const end = Date.now() + 30_000; Date.now() < end; ) {
    now = (await cl.request<DeviceSummary>('info', { name: 'vol' })).openCount;
    if (now === n) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`vol: open count still ${now}, not ${n}`);
}

/** the holder released: the count drops to 0 and `remove` succeeds */
async function removable(): Promise<void> {
  await openCountIs(0);
  await cli(sb, ['remove', 'vol']);
}

/** the local TCP ports of process `pid`'s sockets (/proc: its descriptors' inodes in the socket tables) */
function tcpPortsOf(pid: number): number[] {
  const fdDir = `/proc/${pid}/fd`;
  const inodes = new Set<string>();
  for (const fd of fs.readdirSync(fdDir)) {
    const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(path.join(fdDir, fd)));
    if (m) inodes.add(m[1]!);
  }
  // by inode: the kernel's seq_file may list a socket twice when the table changes between
  // two read() calls of a long file (other tests open and close connections meanwhile)
  const ports = new Map<string, number>();
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    for (const line of fs.readFileSync(table, 'utf8').split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length > 9 && inodes.has(f[9]!)) ports.set(f[9]!, parseInt(f[1]!.split(':')[1]!, 16));
    }
  }
  return [...ports.values()];
}

/** the client address the daemon must name for an nbdsh connected over TCP */
function tcpPeer(s: Nbdsh): string {
  const ports = tcpPortsOf(s.child.pid!);
  expect(ports).toHaveLength(1);
  return `127.0.0.1:${ports[0]}`;
}

beforeAll(async () => {
  requireTools(['nbdsh']);
  sb = sandbox();
  sock = nbdSock(sb);
  await cli(sb, ['daemon', '--nbd-listen', '127.0.0.1:0']);
  cl = await client(sb);
  port = (await cl.request<HelloResult>('hello')).nbdTcp!.port;
});

// a scenario that failed leaves neither clients nor vol to the next
afterEach(async () => {
  for (const s of sessions.splice(0)) s.kill();
  await dmkit(sb, ['remove', '-f', 'vol']);
});

afterAll(async () => {
  cl?.close();
  if (sb) await cleanup(sb);
});

describe.each(TABLES)('remove names the NBD clients holding a device: %s', (_what, table) => {
  test('a client on the Unix socket; NBD_CMD_DISC releases it', async () => {
    await cli(sb, ['create', 'vol', '--table', table()]);
    const s = await connect('unix');
    expect(await refused()).toBe(busy(1, `exported over NBD as 'vol' to a client on ${sock}`));
    await s.ok('h.shutdown()'); // NBD_CMD_DISC; nbdsh stays
    await removable();
    await s.close();
  });

  test('a client over TCP by its address; closing the socket without DISC releases it', async () => {
    await cli(sb, ['create', 'vol', '--table', table()]);
    const s = await connect('tcp');
    expect(await refused()).toBe(busy(1, `exported over NBD as 'vol' to ${tcpPeer(s)}`));
    await s.close(); // nbdsh exits without DISC
    await removable();
  });

  test('several clients: one entry, counted, each TCP client by its address, a socket\'s clients together', async () => {
    await cli(sb, ['create', 'vol', '--table', table()]);
    const u1 = await connect('unix');
    const u2 = await connect('unix');
    expect(await refused()).toBe(busy(2, `exported over NBD as 'vol' to 2 clients on ${sock}`));
    const t = await connect('tcp');
    const at = tcpPeer(t);
    expect(await refused()).toBe(busy(3, `exported over NBD as 'vol' to 3 clients: ${at}, 2 clients on ${sock}`));
    await u1.close();
    await openCountIs(2);
    expect(await refused()).toBe(busy(2, `exported over NBD as 'vol' to 2 clients: ${at}, a client on ${sock}`));
    await t.ok('h.shutdown()');
    await openCountIs(1);
    expect(await refused()).toBe(busy(1, `exported over NBD as 'vol' to a client on ${sock}`));
    await u2.close();
    await removable();
  });

  test('clients killed with SIGKILL while writes are in flight release their holders', async () => {
    await cli(sb, ['create', 'vol', '--table', table()]);
    const u = await connect('unix');
    const t = await connect('tcp');
    const at = tcpPeer(t);
    expect(await refused()).toBe(busy(2, `exported over NBD as 'vol' to 2 clients: ${at}, a client on ${sock}`));
    const inFlight = `for i in range(64): h.aio_pwrite(bytes([i]) * 65536, i * 65536)\nresult = h.aio_in_flight()`;
    expect(await u.ok<number>(inFlight)).toBeGreaterThan(0);
    expect(await t.ok<number>(inFlight)).toBeGreaterThan(0);
    u.kill();
    await openCountIs(1);
    expect(await refused()).toBe(busy(1, `exported over NBD as 'vol' to ${at}`));
    t.kill();
    await removable();
  });
});

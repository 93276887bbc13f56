/**
 * Device state seen through the daemon's NBD export, with nbdsh holding connections open
 * between CLI calls: an NBD connection is an opener (open count, EBUSY, deferred removal
 * at the last disconnect), `remove -f` ends the connection (ESHUTDOWN or a closed socket)
 * and the daemon serves on, a suspended device queues NBD writes until resume (and a table
 * swapped in meanwhile takes them), a read-only device refuses writes with EPERM.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { ControlClient } from '../../src/daemon/client.ts';
import type { DeviceSummary } from '../../src/daemon/protocol.ts';
import { cleanup, client, daemonPid, dmkit, image, ok as cli, pattern, sandbox, type Sandbox } from '../helpers/daemon.ts';
import { devUri, Nbdsh } from '../helpers/daemon-nbd.ts';
import { ok, requireTools, run, sha256 } from '../helpers/nbd-tools.ts';

let sb: Sandbox;
let cl: ControlClient;
let pid: number;
const sessions: Nbdsh[] = [];

const uri = (name: string): string => devUri(sb, name);

async function session(name: string): Promise<Nbdsh> {
  const s = await Nbdsh.connect(uri(name));
  sessions.push(s);
  return s;
}

/** the device's open count as `dmkit info` prints it */
async function openCount(name: string): Promise<number> {
  const m = /^Open count: +(\d+)$/m.exec(await cli(sb, ['info', name]));
  if (!m) throw new Error(`no open count for ${name}`);
  return Number(m[1]);
}

async function deviceNames(): Promise<string[]> {
  return (await cl.request<{ devices: DeviceSummary[] }>('list')).devices.map((d) => d.name);
}

/** poll (through the control socket) until `name` is gone; bounded, not a timing assertion */
async function waitRemoved(name: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (!(await deviceNames()).includes(name)) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`${name} was not removed`);
}

/** Python for the 8 KiB pattern nbdsh writes: bytes(i*7+3 & 255) */
const PY_DATA = 'bytes((i * 7 + 3) & 255 for i in range(8192))';
const DATA = Buffer.from(Array.from({ length: 8192 }, (_, i) => (i * 7 + 3) & 255));

beforeAll(async () => {
  requireTools(['nbdinfo', 'nbdsh']);
  sb = sandbox();
  await cli(sb, ['daemon']);
  cl = await client(sb);
  pid = daemonPid(sb);
});

afterAll(async () => {
  for (const s of sessions) s.kill();
  cl?.close();
  if (sb) await cleanup(sb);
});

describe('device state through NBD', { timeout: 60_000 }, () => {
  test('a connection is an opener: open count, EBUSY, deferred removal at the last disconnect', async () => {
    const a = image(sb, 'held.img', 1 << 20, (i) => (i * 13) & 255);
    await cli(sb, ['create', 'held', '--table', `0 2048 linear ${a} 0`]);
    expect(await openCount('held')).toBe(0);

    const s1 = await session('held');
    expect(await openCount('held')).toBe(1);
    const s2 = await session('held');
    expect(await openCount('held')).toBe(2);
    await s2.close();
    for (let i = 0; i < 200 && (await cl.request<DeviceSummary>('info', { name: 'held' })).openCount !== 1; i++) {
      await new Promise((r) => setTimeout(r, 25));
    }
    expect(await openCount('held')).toBe(1);

    const busy = await dmkit(sb, ['remove', 'held']);
    expect(busy).toMatchObject({ code: 1, stdout: '', stderr: `dmkit: held: device is busy (open count 1: exported over NBD as 'held' to a client on ${path.join(sb.runtimeDir, 'nbd.sock')})\n` });
    expect(await s1.ok('result = h.pread(512, 512).hex()')).toBe(fs.readFileSync(a).subarray(512, 1024).toString('hex'));

    await cli(sb, ['remove', '--deferred', 'held']);
    expect(await cli(sb, ['info', 'held'])).toMatch(/^State: +ACTIVE \(DEFERRED REMOVE\)$/m);
    // no new openers: not listed, not connectable; the held connection still works
    const list = JSON.parse(await ok('nbdinfo', ['--list', '--json', uri('')])) as { exports: Array<{ 'export-name': string }> };
    expect(list.exports.map((e) => e['export-name'])).not.toContain('held');
    expect((await run('nbdinfo', [uri('held')])).code).not.toBe(0);
    await s1.ok(`h.pwrite(${PY_DATA}, 0); h.flush()`);
    expect(fs.readFileSync(a).subarray(0, DATA.length).equals(DATA)).toBe(true);

    await s1.close();
    await waitRemoved('held');
    const gone = await dmkit(sb, ['info', 'held']);
    expect(gone).toMatchObject({ code: 1, stderr: 'dmkit: held: no such device\n' });
    expect(JSON.parse(fs.readFileSync(sb.stateFile, 'utf8')).devices.map((d: { name: string }) => d.name)).not.toContain('held');
  });

  test('remove -f with clients connected: queued I/O fails, connections end, the daemon serves on', async () => {
    const a = image(sb, 'gone.img', 1 << 20);
    const b = image(sb, 'other.img', 1 << 20, (i) => i & 255);
    await cli(sb, ['create', 'gone', '--table', `0 2048 linear ${a} 0`]);
    await cli(sb, ['create', 'other', '--table', `0 2048 linear ${b} 0`]);
    const idle = await session('gone');
    const queued = await session('gone');
    const bystander = await session('other');
    await idle.ok('h.pread(4096, 0)');
    await cli(sb, ['suspend', 'gone']);
    await queued.ok(`c = h.aio_pwrite(${PY_DATA}, 0)
for _ in range(3): h.poll(20)`);
    expect(await queued.ok('result = h.aio_command_completed(c)')).toBe(false);

    expect(await dmkit(sb, ['remove', '-f', 'gone'])).toMatchObject({ code: 0, stdout: '', stderr: '' });
    // the queued write went to the error table swapped in by -f (or was cut off)
    const w = await queued.run(`done, n = False, 0
while not done and n < 200:
    h.poll(100); n += 1
    done = h.aio_command_completed(c)`);
    expect(w).toMatchObject({ ok: false });
    if (!w.ok) expect(w.errno).toMatch(/^(EIO|ESHUTDOWN)$/);
    // a request after the removal: ESHUTDOWN if it races the end of the connection, else
    // the closed socket (libnbd: ENOTCONN)
    for (const s of [idle, queued]) {
      const r = await s.run('h.pread(4096, 0)');
      expect(r).toMatchObject({ ok: false });
      if (!r.ok) expect(r.errno).toMatch(/^(ESHUTDOWN|ENOTCONN|ECONNRESET|EPIPE)$/);
      expect(await s.ok('result = h.aio_is_dead() or h.aio_is_closed()')).toBe(true);
    }
    expect(await deviceNames()).not.toContain('gone');
    expect(fs.readFileSync(a).every((x) => x === 0)).toBe(true);

    expect(daemonPid(sb)).toBe(pid);
    expect(await cli(sb, ['ls'])).toMatch(/^other\t\(253:\d+\)$/m);
    expect(await bystander.ok('result = h.pread(512, 0)')).toBe(fs.readFileSync(b).subarray(0, 512).toString('hex'));
    expect((await ok('nbdinfo', ['--size', uri('other')])).trim()).toBe(String(1 << 20));
    await bystander.close();
    await cli(sb, ['remove', '--retry', 'other']);
  });

  test('suspend queues an NBD write until resume; a table swapped in meanwhile takes it', async () => {
    const qa = image(sb, 'qa.img', 1 << 20);
    const qb = image(sb, 'qb.img', 2 << 20);
    await cli(sb, ['create', 'q', '--table', `0 2048 linear ${qa} 0`]);
    const s = await session('q');
    await cli(sb, ['suspend', 'q']);
    expect(await cli(sb, ['info', '-c', '--noheadings', 'q'])).toMatch(/^q +253 +\d+ L-sw +1 /);

    // the suspend is confirmed: the write is sent, and whatever is polled, it stays pending
    await s.ok(`c = h.aio_pwrite(${PY_DATA}, 4096)
for _ in range(5): h.poll(20)`);
    expect(await s.ok('result = [h.aio_command_completed(c), h.aio_in_flight()]')).toEqual([false, 1]);

    await cli(sb, ['load', 'q', '--table', `0 2048 linear ${qb} 16`]);
    expect(await s.ok('h.poll(20); result = h.aio_command_completed(c)')).toBe(false);
    expect(fs.readFileSync(qa).every((x) => x === 0) && fs.readFileSync(qb).every((x) => x === 0)).toBe(true);

    await cli(sb, ['resume', 'q']);
    // aio_command_completed retires the command the first time it returns True
    expect(await s.ok(`done, n = False, 0
while not done and n < 200:
    h.poll(100); n += 1
    done = h.aio_command_completed(c)
result = [done, h.aio_in_flight()]`)).toEqual([true, 0]);
    await s.ok('h.flush()');
    const b = fs.readFileSync(qb);
    expect(b.subarray(16 * 512 + 4096, 16 * 512 + 4096 + DATA.length).equals(DATA)).toBe(true);
    expect(sha256(b)).toBe(sha256(Buffer.concat([Buffer.alloc(16 * 512 + 4096), DATA, Buffer.alloc((2 << 20) - 16 * 512 - 4096 - DATA.length)])));
    expect(fs.readFileSync(qa).every((x) => x === 0)).toBe(true);
    expect(await s.ok('result = h.pread(8192, 4096).hex()')).toBe(DATA.toString('hex'));
    await s.close();
    await cli(sb, ['remove', '--retry', 'q']);
  });

  test('read-only device: write, trim and zero fail with EPERM, reads work, the image is untouched', async () => {
    const file = path.join(sb.dir, 'ro.img');
    fs.writeFileSync(file, pattern(1 << 20, 77));
    const digest = sha256(fs.readFileSync(file));
    await cli(sb, ['create', '-r', 'ro', '--table', `0 2048 linear ${file} 0`]);
    expect(await cli(sb, ['info', 'ro'])).toMatch(/^State: +ACTIVE \(READ-ONLY\)$/m);
    const j = JSON.parse(await ok('nbdinfo', ['--json', uri('ro')])) as { exports: Array<{ is_read_only: boolean }> };
    expect(j.exports[0]!.is_read_only).toBe(true);

    const s = await session('ro');
    const tries = {
      write: await s.run('h.pwrite(b"x" * 4096, 0)'),
      writeFua: await s.run('h.pwrite(b"x" * 4096, 8192, nbd.CMD_FLAG_FUA)'),
      trim: await s.run('h.trim(65536, 0)'),
      zero: await s.run('h.zero(65536, 65536)'),
    };
    for (const [what, r] of Object.entries(tries)) expect(r, what).toMatchObject({ ok: false, errno: 'EPERM' });
    expect(await s.ok('result = hashlib.sha256(h.pread(1 << 20, 0)).hexdigest()')).toBe(digest);
    await s.ok('h.flush()');
    await s.close();
    expect(sha256(fs.readFileSync(file))).toBe(digest);
    expect(daemonPid(sb)).toBe(pid);
  });
});

/**
 * The daemon as a process: explicit and automatic start, single instance, the control
 * socket's permissions and protocol robustness, SIGKILL and restart with the same devices
 * and data, a device that cannot be restored, and a clean SIGTERM.
 */
import fs from 'node:fs';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ControlClient } from '../../src/daemon/client.ts';
import type { HelloResult } from '../../src/daemon/protocol.ts';
import {
  cleanup, client, daemonPid, dmkit, image, isAlive, ok, pattern, sandbox, signalDaemon, type Sandbox,
} from '../helpers/daemon.ts';

let sb: Sandbox;
let a: string;
let b: string;
let c: string;

beforeAll(() => {
  sb = sandbox();
  a = image(sb, 'a.img', 1 << 20);
  b = image(sb, 'b.img', 1 << 20);
  c = image(sb, 'c.img', 1 << 20);
});
afterAll(() => cleanup(sb));

/** send raw lines, collect `count` reply objects */
function raw(lines: string, count: number): Promise<Array<Record<string, unknown>>> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(sb.socket);
    let buf = '';
    const out: Array<Record<string, unknown>> = [];
    s.setEncoding('utf8');
    s.on('error', reject);
    s.on('data', (d: string) => {
      buf += d;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        out.push(JSON.parse(buf.slice(0, nl)) as Record<string, unknown>);
        buf = buf.slice(nl + 1);
      }
      if (out.length >= count) {
        s.destroy();
        resolve(out);
      }
    });
    s.write(lines);
  });
}

async function readBack(cl: ControlClient, name: string, offset: number, length: number): Promise<Buffer> {
  const r = await cl.request<{ data: string }>('io', { op: 'read', name, offset, length });
  return Buffer.from(r.data, 'base64');
}

describe('dmkit daemon', () => {
  it('starts in the background once, with a private socket and its own pid', async () => {
    expect(await dmkit(sb, ['daemon'])).toMatchObject({ code: 0, stdout: '', stderr: '' });
    const pid = daemonPid(sb);
    expect(isAlive(pid)).toBe(true);
    expect(fs.statSync(sb.socket).mode & 0o777).toBe(0o600);
    expect(fs.statSync(sb.runtimeDir).mode & 0o777).toBe(0o700);
    const [again, fg] = await Promise.all([dmkit(sb, ['daemon']), dmkit(sb, ['daemon', '--foreground'])]);
    expect(again).toMatchObject({ code: 1, stdout: '', stderr: `dmkit: a dmkit daemon is already running on ${sb.socket}\n` });
    expect(fg).toMatchObject({ code: 1, stdout: '', stderr: `dmkit: a dmkit daemon is already running (pid ${pid}) on ${sb.socket}\n` });
    const cl = await client(sb);
    expect(await cl.request<HelloResult>('hello')).toMatchObject({ protocol: 1, pid, runtimeDir: sb.runtimeDir, stateDir: sb.stateDir, restoreErrors: [] });
    cl.close();
  });

  it('answers malformed and unknown requests with errors and keeps the connection', async () => {
    const replies = await raw([
      'this is not json',
      '[1, 2]',
      '{"op": "hello"}',
      '{"id": 1, "op": "frobnicate"}',
      '{"id": 2, "op": "create", "args": {"name": 5}}',
      '{"id": 3, "op": "info", "args": {"name": "ghost"}}',
      '{"id": 4, "op": "hello"}',
    ].join('\n') + '\n', 7);
    expect(replies.slice(0, 3)).toEqual([
      { id: null, ok: false, error: { code: 'EBADMSG', message: expect.stringContaining('malformed JSON request') } },
      { id: null, ok: false, error: { code: 'EBADMSG', message: 'a request must be a JSON object {id, op, args}' } },
      { id: null, ok: false, error: { code: 'EBADMSG', message: 'request without an id (a number or a string)' } },
    ]);
    const byId = new Map(replies.slice(3).map((r) => [r.id, r]));
    expect(byId.get(1)).toEqual({ id: 1, ok: false, error: { code: 'ENOSYS', message: "unknown operation 'frobnicate'" } });
    expect(byId.get(2)).toEqual({ id: 2, ok: false, error: { code: 'EINVAL', message: "create: argument 'name' must be a non-empty string (got 5)" } });
    expect(byId.get(3)).toEqual({ id: 3, ok: false, error: { code: 'ENXIO', message: 'ghost: no such device' } });
    expect(byId.get(4)).toMatchObject({ id: 4, ok: true, result: { protocol: 1 } });
  });

  it('comes back after SIGKILL with the same devices, tables and flushed data', async () => {
    // device numbers follow creation order: z-bottom 0, a-top 1, ro 2, sus 3
    await ok(sb, ['create', 'z-bottom', '--table', `0 2048 linear ${a} 0`]);
    await ok(sb, ['create', 'a-top', '--table', '0 1024 linear dm:z-bottom 1024', '-u', 'top-uuid']);
    await ok(sb, ['create', 'ro', '-r', '--table', `0 512 linear ${b} 0`]);
    await ok(sb, ['create', 'sus', '--table', '0 64 zero']);
    await Promise.all([ok(sb, ['load', 'sus', '--table', `0 128 linear ${b} 1024`]), ok(sb, ['suspend', 'sus'])]);
    const data = pattern(64 * 1024, 7);
    const cl = await client(sb);
    await cl.request('io', { op: 'write', name: 'a-top', offset: 4096, data: data.toString('base64') });
    await cl.request('io', { op: 'flush', name: 'a-top' });
    cl.close();
    const before = await Promise.all([ok(sb, ['info', '-c']), ok(sb, ['table']), ok(sb, ['table', '--inactive', 'sus'])]);

    const old = await signalDaemon(sb, 'SIGKILL');
    expect(fs.existsSync(sb.socket)).toBe(true); // stale: the next command replaces the daemon
    expect(await ok(sb, ['ls'])).toBe('a-top\t(253:1)\nro\t(253:2)\nsus\t(253:3)\nz-bottom\t(253:0)\n');
    expect(daemonPid(sb)).not.toBe(old);
    expect(await Promise.all([ok(sb, ['info', '-c']), ok(sb, ['table']), ok(sb, ['table', '--inactive', 'sus'])])).toEqual(before);
    // the bytes went to a.img at (1024 sectors + 4096 bytes) through both linear layers
    expect(fs.readFileSync(a).subarray(1024 * 512 + 4096, 1024 * 512 + 4096 + data.length).equals(data)).toBe(true);
    const cl2 = await client(sb);
    expect((await readBack(cl2, 'a-top', 4096, data.length)).equals(data)).toBe(true);
    cl2.close();
    await ok(sb, ['resume', 'sus']);
    expect(await ok(sb, ['table', 'sus'])).toBe(`0 128 linear ${b} 1024\n`);
    await ok(sb, ['remove', 'a-top', 'z-bottom', 'ro', 'sus']);
  });

  it('keeps a device whose table cannot be restored, without its table', async () => {
    await ok(sb, ['create', 'keep', '--table', `0 2048 linear ${c} 0`]);
    await ok(sb, ['create', 'up', '--table', '0 2048 linear dm:keep 0']);
    await signalDaemon(sb, 'SIGTERM');
    fs.renameSync(c, `${c}.away`);
    expect(await ok(sb, ['info', '-c', '--noheadings'])).toBe(
      `keep             253   0 ---w    0    0      0                                 \n`
      + `up               253   1 ---w    0    0      0                                 \n`);
    const cl = await client(sb);
    const hello = await cl.request<HelloResult>('hello');
    cl.close();
    expect(hello.restoreErrors).toEqual([
      { name: 'keep', error: `keep: line 1: linear: device lookup failed: ${c}: no such file or device` },
      { name: 'up', error: 'up: line 1: linear: device lookup failed: dm:keep: no such device (it uses dm:keep, which could not be restored)' },
    ]);
    const state = JSON.parse(fs.readFileSync(sb.stateFile, 'utf8')) as { devices: Array<{ name: string; table: string | null }> };
    expect(state.devices.map((d) => [d.name, d.table])).toEqual([['keep', `0 2048 linear ${c} 0`], ['up', '0 2048 linear dm:keep 0']]);
    expect(fs.readFileSync(`${sb.runtimeDir}/daemon.log`, 'utf8')).toContain(`restore: keep: keep: line 1: linear: device lookup failed: ${c}`);
    // once the image is back, the kept table loads
    fs.renameSync(`${c}.away`, c);
    await ok(sb, ['load', 'keep', '--table', state.devices[0]!.table!]);
    await ok(sb, ['resume', 'keep']);
    await ok(sb, ['load', 'up', '--table', state.devices[1]!.table!]);
    await ok(sb, ['resume', 'up']);
    expect(await ok(sb, ['ls', '--tree'])).toBe(`up (253:1)\n └─keep (253:0)\n    └─ (${c})\n`);
  });

  it('exits cleanly on SIGTERM, also with I/O queued on a suspended device, keeping the state', async () => {
    await ok(sb, ['suspend', 'keep']);
    const cl = await client(sb);
    // up is active but sits on suspended keep: this write waits, and so would a flush of up
    const pending = cl.request('io', { op: 'write', name: 'up', offset: 0, data: pattern(4096, 1).toString('base64') })
      .then(() => null, (err: unknown) => err);
    await cl.request('hello');
    await signalDaemon(sb, 'SIGTERM');
    expect(await pending).toMatchObject({ code: expect.stringMatching(/^(ENXIO|ECONNRESET)$/) });
    cl.close();
    expect(fs.existsSync(sb.socket)).toBe(false);
    expect(fs.existsSync(sb.pidFile)).toBe(false);
    const state = JSON.parse(fs.readFileSync(sb.stateFile, 'utf8')) as { version: number; devices: Array<{ name: string; suspended: boolean }> };
    expect(state.version).toBe(1);
    expect(state.devices.map((d) => [d.name, d.suspended])).toEqual([['keep', true], ['up', false]]);
    const log = fs.readFileSync(`${sb.runtimeDir}/daemon.log`, 'utf8');
    expect(log).toContain('SIGTERM: shutting down');
    expect(log).toContain('shutdown: up: stacked on a suspended device; closing without flush');
  });
});

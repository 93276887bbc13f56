/**
 * I/O through the daemon: a write queued by suspend lands after resume on the swapped-in
 * table; `dm:` stacking (linear over striped over files) with open counts, EBUSY and the
 * bytes checked against an independent model of the striping; events, messages and
 * progress through a target plugin loaded with `dmkit daemon --plugin`.
 */
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ControlClient } from '../../src/daemon/client.ts';
import { cleanup, client, dmkit, image, ok, pattern, sandbox, start, counterPlugin, type Sandbox } from '../helpers/daemon.ts';

let sb: Sandbox;
let cl: ControlClient;

beforeAll(async () => {
  sb = sandbox();
  expect(await dmkit(sb, ['daemon', '--plugin', counterPlugin(sb)])).toMatchObject({ code: 0, stderr: '' });
  cl = await client(sb);
});
afterAll(async () => {
  cl?.close();
  await cleanup(sb);
});

const write = (name: string, offset: number, data: Buffer): Promise<unknown> =>
  cl.request('io', { op: 'write', name, offset, data: data.toString('base64') });
const read = async (name: string, offset: number, length: number): Promise<Buffer> =>
  Buffer.from((await cl.request<{ data: string }>('io', { op: 'read', name, offset, length })).data, 'base64');
const slice = (file: string, offset: number, length: number): Buffer => fs.readFileSync(file).subarray(offset, offset + length);

describe('I/O through the daemon', () => {
  it('queues a write while suspended and lands it on the table swapped in at resume', async () => {
    const a = image(sb, 'qa.img', 1 << 20);
    const b = image(sb, 'qb.img', 2 << 20);
    await ok(sb, ['create', 'q', '--table', `0 2048 linear ${a} 0`]);
    await ok(sb, ['suspend', 'q']);
    const data = pattern(8192, 3);
    let landed = false;
    const pending = write('q', 4096, data).then(() => (landed = true));
    // same connection, so the daemon has queued the write before it loads the new table
    await cl.request('load', { name: 'q', table: `0 2048 linear ${b} 16` });
    expect(landed).toBe(false);
    expect(await ok(sb, ['info', '-c', '--noheadings', 'q'])).toMatch(/^q +253 +\d+ LIsw /);
    expect(slice(a, 0, 1 << 20).every((x) => x === 0) && slice(b, 0, 2 << 20).every((x) => x === 0)).toBe(true);
    await ok(sb, ['resume', 'q']);
    await pending;
    await cl.request('io', { op: 'flush', name: 'q' });
    expect(slice(b, 16 * 512 + 4096, data.length).equals(data)).toBe(true);
    expect(slice(a, 0, 1 << 20).every((x) => x === 0)).toBe(true);
    expect((await read('q', 4096, data.length)).equals(data)).toBe(true);
    await ok(sb, ['remove', 'q']);
  });

  it('stacks linear over striped over files, with open counts and EBUSY', async () => {
    const s0 = image(sb, 's0.img', 1 << 20);
    const s1 = image(sb, 's1.img', 1 << 20);
    await ok(sb, ['create', 'stripe', '--table', `0 4096 striped 2 8 ${s0} 0 ${s1} 0`]);
    await ok(sb, ['create', 'mid', '--table', '0 4096 linear dm:stripe 0']);
    await ok(sb, ['create', 'top', '--table', '0 2048 linear dm:mid 1024']);
    expect(await ok(sb, ['ls', '--tree'])).toBe(
      'top (253:2)\n └─mid (253:1)\n    └─stripe (253:0)\n       ├─ (' + s0 + ')\n       └─ (' + s1 + ')\n');
    expect(await ok(sb, ['info', '-c', '--noheadings'])).toMatch(/^mid +253 +1 L--w +1 .*\nstripe +253 +0 L--w +1 .*\ntop +253 +2 L--w +0 /);
    const [busyStripe, busyMid] = await Promise.all([dmkit(sb, ['remove', 'stripe']), dmkit(sb, ['remove', 'mid', 'stripe'])]);
    expect(busyStripe).toMatchObject({ code: 1, stdout: '', stderr: 'dmkit: stripe: device is busy (open count 1: used by dm:mid)\n' });
    expect(busyMid.stderr).toBe('dmkit: mid: device is busy (open count 1: used by dm:top)\ndmkit: stripe: device is busy (open count 1: used by dm:mid)\n');

    const data = pattern(96 * 1024, 11);
    await write('top', 3 * 512, data);
    await cl.request('io', { op: 'flush', name: 'top' });
    // model: top sector t → mid sector t+1024 → stripe sector x; chunk 8 over 2 stripes
    const img = [fs.readFileSync(s0), fs.readFileSync(s1)];
    for (let i = 0; i < data.length / 512; i++) {
      const x = 3 + i + 1024;
      const chunk = Math.floor(x / 8);
      const onStripe = Math.floor(chunk / 2) * 8 + (x % 8);
      const got = img[chunk % 2]!.subarray(onStripe * 512, onStripe * 512 + 512);
      expect(got.equals(data.subarray(i * 512, i * 512 + 512))).toBe(true);
    }
    expect((await read('top', 3 * 512, data.length)).equals(data)).toBe(true);
    expect((await read('stripe', (1024 + 3) * 512, data.length)).equals(data)).toBe(true);
    expect(await ok(sb, ['remove_all'])).toBe('');
    expect(await ok(sb, ['ls'])).toBe('No devices found\n');
  });

  it('reads, writes and flushes with the dmkit io debugging verb', async () => {
    const f = image(sb, 'io.img', 1 << 20);
    await ok(sb, ['create', 'iov', '--table', `0 2048 linear ${f} 0`]);
    const data = pattern(4096, 5);
    const w = await dmkit(sb, ['io', 'write', 'iov', '8192'], { input: data });
    expect(w).toMatchObject({ code: 0, stdout: '', stderr: '' });
    expect(await ok(sb, ['io', 'flush', 'iov'])).toBe('');
    const r = await dmkit(sb, ['io', 'read', 'iov', '8192', '4096']);
    expect(r.code).toBe(0);
    expect(r.raw.equals(data)).toBe(true);
    expect(slice(f, 8192, 4096).equals(data)).toBe(true);
    expect(await dmkit(sb, ['io', 'read', 'iov', '100', '512'])).toMatchObject({
      code: 1, stderr: 'dmkit: offset 100 is not a non-negative multiple of 512 bytes\n' });
    await ok(sb, ['remove', 'iov']);
  });

  it('loads target plugins and passes messages and events', async () => {
    expect((await ok(sb, ['targets'])).split('\n')).toContain('counter          v1.2.3');
    await ok(sb, ['create', 'cnt', '--table', '0 64 counter 4']);
    expect(await ok(sb, ['status', 'cnt'])).toBe('0 64 counter 0/4\n');
    expect(await ok(sb, ['table', 'cnt'])).toBe('0 64 counter 4\n');
    expect(await ok(sb, ['message', 'cnt', '0', 'get'])).toBe('done 0\n');
    expect(await dmkit(sb, ['message', 'cnt', '0', 'bogus', 'words'])).toMatchObject({
      code: 1, stdout: '', stderr: "dmkit: counter: unknown message 'bogus words' (expected step [N] or get)\n" });

    const waiter = start(sb, ['wait', '-v', 'cnt', '0']);
    expect(await ok(sb, ['message', 'cnt', '0', 'step'])).toBe('');
    const waited = await waiter.done;
    expect(waited).toMatchObject({ code: 0, stderr: '' });
    expect(waited.stdout).toContain('Name:              cnt\n');
    expect(waited.stdout).toMatch(/Event number: {6}[1-9]\n/);
  });

  it('shows progress until complete, and streams events to watchers', async () => {
    const progress = start(sb, ['wait', '--progress', 'cnt']);
    await progress.stderrHas('cnt: count 8/32 sectors (25%), '); // it follows the stream now
    for (let i = 0; i < 3; i++) await ok(sb, ['message', 'cnt', '0', 'step']);
    const p = await progress.done;
    expect(p).toMatchObject({ code: 0, stdout: '' });
    expect(p.stderr).toMatch(/cnt: count 32\/32 sectors \(100%\), [^\n]*, ETA 0:00\n$/);
    for (const line of p.stderr.trimEnd().split('\n')) expect(line).toMatch(/^cnt: count (8|16|24|32)\/32 sectors \((25|50|75|100)%\), \d+(\.\d)? (B|KiB|MiB|GiB)\/s, ETA (-|\d+:\d\d(:\d\d)?)$/);
    expect(await ok(sb, ['status', 'cnt'])).toBe('0 64 counter 4/4\n');
    expect(await dmkit(sb, ['wait', '--progress', 'cnt'])).toMatchObject({ code: 0, stdout: '', stderr: 'cnt: no background work; nothing to wait for\n' });

    // the watch stream reports events and changes until it is cancelled
    const items: unknown[] = [];
    const watch = cl.stream('watch', {}, (item) => items.push(item));
    await cl.request('hello'); // the watch is registered before anything below happens
    await ok(sb, ['message', 'cnt', '0', 'step']);
    await ok(sb, ['remove', 'cnt']);
    watch.cancel();
    await expect(watch.done).rejects.toMatchObject({ code: 'ECANCELED' });
    expect(items).toEqual([{ type: 'event', name: 'cnt', eventNr: 5 }, { type: 'change' }]);
  });

  it('follows a mirror resync with wait --progress until the legs are in sync', async () => {
    const a = image(sb, 'ma.img', 8 << 20, (i) => (i * 13) & 0xff);
    const b = image(sb, 'mb.img', 8 << 20);
    // the second leg sits on a suspended device: resync writes queue there until it resumes
    await ok(sb, ['create', 'leg', '--table', `0 16384 linear ${b} 0`]);
    await ok(sb, ['suspend', 'leg']);
    await ok(sb, ['create', 'm', '--table', `0 16384 mirror core 1 256 2 ${a} 0 dm:leg 0`]);
    const waiter = start(sb, ['wait', '--progress', 'm']);
    await waiter.stderrHas('m: resync 0/16384 sectors (0%), ');
    expect(await ok(sb, ['resume', 'leg'])).toBe('');
    const r = await waiter.done;
    expect(r).toMatchObject({ code: 0, stdout: '' });
    expect(r.stderr).toMatch(/m: resync 16384\/16384 sectors \(100%\), [^\n]*, ETA 0:00\n$/);
    for (const line of r.stderr.trimEnd().split('\n')) expect(line).toMatch(/^m: resync \d+\/16384 sectors \(\d+%\), \d+(\.\d)? (B|KiB|MiB|GiB)\/s, ETA (-|\d+:\d\d(:\d\d)?)$/);
    expect(await ok(sb, ['status', 'm'])).toBe(`0 16384 mirror 2 ${a} dm:leg 64/64 1 AA 1 core\n`);
    await cl.request('io', { op: 'flush', name: 'm' });
    expect(fs.readFileSync(b).equals(fs.readFileSync(a))).toBe(true);
    await ok(sb, ['remove', 'm', 'leg']);
  });
});

/**
 * `dmkit events` and progress with rate and ETA, through the real CLI and daemon: a
 * replicator group whose slink 1 is a blockdev slink to an image file, followed by
 * `dmkit events --json` while its slink is suspended and resumed (also in a burst), a full
 * resync runs under writes that dirty regions it already copied, a verify runs, and a
 * device is created and removed. The tests run in order on one daemon.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ControlClient } from '../../src/daemon/client.ts';
import type { ProgressItem } from '../../src/daemon/protocol.ts';
import { cleanup, client, dmkit, image, ok, pattern, ROOT, sandbox, start, type Sandbox } from '../helpers/daemon.ts';

const CLI = path.join(ROOT, 'bin', 'dmkit.js');
const SECTORS = 16384; // 8 MiB per device
const REGION = 64;
const REGIONS = SECTORS / REGION;
const RING = 8192;

type Ev = Record<string, string | number | boolean | undefined> & { seq: number; kind: string; object: string; name: string; state: string; text: string };

let sb: Sandbox;
let cl: ControlClient;

/** a CLI child whose stdout is read line by line as it comes */
class Lines {
  readonly child: ChildProcessWithoutNullStreams;
  readonly lines: string[] = [];
  stderr = '';
  readonly exited: Promise<number | null>;
  #buf = '';
  #waiters: Array<() => void> = [];

  constructor(args: string[]) {
    this.child = spawn(process.execPath, [CLI, ...args], { cwd: ROOT, env: sb.env, stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stdin.end();
    this.child.stdout.setEncoding('utf8');
    this.child.stdout.on('data', (d: string) => {
      this.#buf += d;
      const parts = this.#buf.split('\n');
      this.#buf = parts.pop()!;
      this.lines.push(...parts);
      for (const w of this.#waiters.splice(0)) w();
    });
    this.child.stderr.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.exited = new Promise((resolve) => this.child.on('close', (code) => {
      for (const w of this.#waiters.splice(0)) w();
      resolve(code);
    }));
  }

  get events(): Ev[] {
    return this.lines.map((l) => JSON.parse(l) as Ev);
  }

  /** resolves once a line satisfies `pred`; returns its index */
  async until(pred: (line: string) => boolean, what: string): Promise<number> {
    for (;;) {
      const i = this.lines.findIndex(pred);
      if (i >= 0) return i;
      if (this.child.exitCode !== null) throw new Error(`exited before ${what}: ${this.stderr}`);
      await new Promise<void>((r) => this.#waiters.push(r));
    }
  }

  /** resolves once `n` lines have come */
  async untilCount(n: number): Promise<number> {
    // the count of lines received, not of predicate calls: until() rescans every line each time
    await this.until(() => this.lines.length >= n, `${n} lines`);
    return this.lines.length;
  }

  /** resolves once an event matches every field of `want` */
  untilEvent(want: Partial<Ev>): Promise<number> {
    const match = (l: string): boolean => {
      const ev = JSON.parse(l) as Ev;
      return Object.entries(want).every(([k, v]) => ev[k] === v);
    };
    return this.until(match, JSON.stringify(want));
  }
}

/** the plain line grammar of docs/cli.md */
const LINE = /^(\S+) (exists|create|change|destroy) (device|site)((?: [A-Za-z]+=(?:"(?:[^"\\]|\\.)*"|[^\s"]+))*)$/;
function parsePlain(line: string): Record<string, string> {
  const m = LINE.exec(line);
  if (!m) throw new Error(`not an events line: ${line}`);
  const out: Record<string, string> = { time: m[1]!, kind: m[2]!, object: m[3]! };
  for (const p of m[4]!.matchAll(/ ([A-Za-z]+)=("(?:[^"\\]|\\.)*"|[^\s"]+)/g)) {
    out[p[1]!] = p[2]!.startsWith('"') ? (JSON.parse(p[2]!) as string) : p[2]!;
  }
  expect(new Date(out.time!).toISOString()).toBe(out.time);
  return out;
}

let follower: Lines;

beforeAll(async () => {
  sb = sandbox();
  const rlog = image(sb, 'rlog', (RING + 64) * 512);
  const local = image(sb, 'local.img', SECTORS * 512, (i) => (i * 7) & 0xff);
  const remote = image(sb, 'remote.img', SECTORS * 512);
  const dlog = image(sb, 'dlog', 64 * 512);
  await ok(sb, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${rlog} 0 auto ${RING} blockdev 1 0 blockdev 3 1 async retest=1`]);
  await ok(sb, ['create', 'vol', '--table', `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${local} nolog 0 1 1 ${remote} disk 3 ${dlog} ${REGION} nosync`]);
  cl = await client(sb); // the site starts in sync (nosync): the full resync below makes it so
}, 120_000);

afterAll(async () => {
  follower?.child.kill('SIGKILL');
  cl?.close();
  await cleanup(sb);
});

describe('dmkit events', () => {
  it('--now prints every device and site as it is, in the plain format, and exits', async () => {
    const out = await ok(sb, ['events', '--now']);
    const lines = out.trimEnd().split('\n').map(parsePlain);
    expect(lines.map((l) => [l.kind, l.object, l.name, l.slink])).toEqual([
      ['exists', 'device', 'repl', undefined],
      ['exists', 'site', 'repl', '1'],
      ['exists', 'device', 'vol', undefined],
    ]);
    expect(lines[0]).toMatchObject({ state: 'active', tables: 'live' });
    expect(lines[1]).toMatchObject({ state: 'asynchronous', mode: 'in-order', consistent: 'true' });
    expect(new Set(lines.map((l) => l.seq)).size).toBe(1); // the snapshot is one point in the stream
  });

  it('follows slink suspend and resume, in order, naming device, slink and state', async () => {
    follower = new Lines(['events', '--json']);
    await follower.untilEvent({ kind: 'exists', name: 'vol' });
    const snap = follower.events;
    expect(snap.every((e) => e.kind === 'exists')).toBe(true);

    await ok(sb, ['message', 'repl', '0', 'slink', 'suspend', '1']);
    await ok(sb, ['message', 'repl', '0', 'slink', 'resume', '1']);
    const resumed = await follower.untilEvent({ name: 'vol', text: 'slink 1 resumed' });
    const changes = follower.events.slice(snap.length, resumed + 1);
    expect(changes.map((e) => [e.object, e.name, e.slink, e.state, e.text])).toEqual([
      ['site', 'repl', 1, 'suspended', 'slink 1 suspended'],
      ['site', 'vol', 1, 'suspended', 'slink 1 suspended'],
      ['site', 'repl', 1, 'asynchronous', 'slink 1 resumed'],
      ['site', 'vol', 1, 'asynchronous', 'slink 1 resumed'],
    ]);
    // every event after the snapshot, numbered one after the other
    expect(changes.map((e) => e.seq)).toEqual(changes.map((_, i) => snap[0]!.seq + 1 + i));
    for (const e of changes) {
      expect(e.kind).toBe('change');
      expect(new Date(e.time as string).toISOString()).toBe(e.time);
      expect(e.eventNr).toBeGreaterThan(0);
    }
  });

  it('loses and reorders nothing in a burst of changes', async () => {
    const from = follower.lines.length;
    const n = 60;
    const replies: Array<Promise<unknown>> = [];
    for (let i = 0; i < n; i++) {
      replies.push(cl.request('message', { name: 'repl', sector: 0, args: ['slink', i % 2 ? 'resume' : 'suspend', '1'] }));
    }
    await Promise.all(replies);
    await follower.untilCount(from + 2 * n);
    const burst = follower.events.slice(from, from + 2 * n);
    const first = burst[0]!.seq;
    expect(burst.map((e) => e.seq)).toEqual(burst.map((_, i) => first + i));
    expect(burst.map((e) => `${e.name} ${e.state}`)).toEqual(
      Array.from({ length: 2 * n }, (_, i) => `${i % 2 ? 'vol' : 'repl'} ${Math.floor(i / 2) % 2 ? 'asynchronous' : 'suspended'}`));
  });

  it('shows a resync with rate and ETA, never going back while writes dirty regions it already copied; events carry its start and finish', async () => {
    const from = follower.lines.length;
    await ok(sb, ['message', 'repl', '0', 'resync-rate', String(1 << 20)]);
    const items: ProgressItem[] = [];
    await ok(sb, ['message', 'repl', '0', 'resync', '1', 'full']);
    // after the resync starts (at 1 MiB/s it runs for seconds): started before, the CLI may find no work yet and exit
    const waiter = start(sb, ['wait', '--progress', 'repl']);
    const stream = cl.stream<ProgressItem, ProgressItem | null>('progress', { name: 'repl', intervalMs: 100 }, (p) => items.push(p));
    // once regions at the start are copied, write there again: more work for this run
    for (let i = 0; !items.some((p) => p.doneSectors >= 8 * REGION); i++) {
      if (i > 3000) throw new Error(`no resync progress: ${JSON.stringify(items.at(-1))}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    const totalBefore = items.at(-1)!.totalSectors;
    for (let r = 0; r < 4; r++) {
      await cl.request('io', { op: 'write', name: 'vol', offset: r * REGION * 512, data: pattern(4096, r + 1).toString('base64') });
    }
    const final = await stream.done;
    const cli = await waiter.done;

    expect(final).toMatchObject({ name: 'repl', work: 'resync', percent: 100, eta: 0 });
    expect(final!.doneSectors).toBe(final!.totalSectors);
    expect(items.length).toBeGreaterThan(2);
    for (let i = 0; i < items.length; i++) {
      const p = items[i]!;
      expect(typeof p.rate).toBe('number');
      expect(p.rate).toBeGreaterThanOrEqual(0);
      expect(p.eta === null || (typeof p.eta === 'number' && p.eta >= 0)).toBe(true);
      expect(p.doneSectors).toBeLessThanOrEqual(p.totalSectors);
      if (i) {
        expect(p.doneSectors, `sample ${i}`).toBeGreaterThanOrEqual(items[i - 1]!.doneSectors);
        expect(p.percent, `sample ${i}`).toBeGreaterThanOrEqual(items[i - 1]!.percent);
      }
    }
    expect(items.some((p) => p.rate > 0 && typeof p.eta === 'number' && p.eta > 0)).toBe(true);
    expect(Math.max(...items.map((p) => p.totalSectors)), 'the writes added work to the run').toBeGreaterThan(totalBefore);

    // the CLI's lines: the same rules
    expect(cli).toMatchObject({ code: 0, stdout: '' });
    let prev = { done: -1, pct: -1 };
    for (const line of cli.stderr.trimEnd().split('\n')) {
      const m = /^repl: resync (\d+)\/(\d+) sectors \((\d+)%\), \d+(\.\d)? (B|KiB|MiB)\/s, ETA (-|\d+:\d\d)$/.exec(line);
      expect(m, line).not.toBeNull();
      const cur = { done: Number(m![1]), pct: Number(m![3]) };
      expect(cur.done).toBeGreaterThanOrEqual(prev.done);
      expect(cur.pct).toBeGreaterThanOrEqual(prev.pct);
      prev = cur;
    }
    expect(prev.pct).toBe(100);

    const done = await follower.untilEvent({ name: 'repl', work: 'resync', phase: 'done' });
    const run = follower.events.slice(from, done + 1).filter((e) => e.name === 'repl');
    const start0 = run.findIndex((e) => e.phase === 'start');
    expect(run[start0]).toMatchObject({ object: 'site', slink: 1, work: 'resync', regions: REGIONS });
    expect(run.findIndex((e) => e.text === 'slink 1 on its dirty logs (resync)')).toBeLessThan(start0);
    expect(run.findIndex((e) => e.text === 'slink 1 in sync: shipping in order')).toBeGreaterThan(start0);
    expect(run.at(-1)).toMatchObject({ slink: 1, state: 'asynchronous', phase: 'done' });
    expect(run.at(-1)!.copiedSectors).toBeGreaterThanOrEqual(SECTORS);
    expect(fs.readFileSync(path.join(sb.dir, 'remote.img')).equals(fs.readFileSync(path.join(sb.dir, 'local.img')))).toBe(true);
  }, 120_000);

  it('carries a verify\'s start and its count of differing regions', async () => {
    expect(await ok(sb, ['message', 'repl', '0', 'verify', '1'])).toBe('verify started\n');
    const i = await follower.untilEvent({ name: 'repl', work: 'verify', phase: 'done' });
    const started = follower.events.findIndex((e) => e.name === 'repl' && e.work === 'verify' && e.phase === 'start');
    expect(started).toBeGreaterThanOrEqual(0);
    expect(started).toBeLessThan(i);
    expect(follower.events[started]).toMatchObject({ slink: 1, regions: REGIONS });
    expect(follower.events[i]).toMatchObject({ object: 'site', slink: 1, differing: 0, regions: REGIONS, text: 'slink 1 verified: 0 region(s) differ' });
  }, 60_000);

  it('reports a device created, loaded, resumed, renamed and removed, then ends on SIGINT', async () => {
    const from = follower.lines.length;
    await ok(sb, ['create', 'z', '--table', '0 8 zero']);
    await ok(sb, ['suspend', 'z']);
    await ok(sb, ['rename', 'z', 'z2']);
    await ok(sb, ['remove', 'z2']);
    await follower.untilEvent({ kind: 'destroy', name: 'z2' });
    // only z's events: a replicator-dev's echo of the verify's end may still arrive after `from`
    const evs = follower.events.slice(from).filter((e) => e.name === 'z' || e.name === 'z2');
    expect(evs.map((e) => [e.kind, e.name, e.op, e.state])).toEqual([
      ['create', 'z', 'create', 'active'],
      ['change', 'z', 'load', 'active'],
      ['change', 'z', 'resume', 'active'],
      ['change', 'z', 'suspend', 'suspended'],
      ['change', 'z2', 'rename', 'suspended'],
      ['destroy', 'z2', 'remove', 'removed'],
    ]);
    expect(evs[4]).toMatchObject({ from: 'z' });
    follower.child.kill('SIGINT');
    expect(await follower.exited).toBe(0);
    expect(follower.stderr).toBe('');
  });

  it('ends quietly when the reader of its output goes away (events | head -1)', async () => {
    const head = new Lines(['events']);
    await head.until(() => true, 'a first line');
    expect(parsePlain(head.lines[0]!)).toMatchObject({ kind: 'exists', name: 'repl' });
    head.child.stdout.destroy(); // like head(1) exiting after its line
    // it notices at the next line it cannot write
    await ok(sb, ['create', 'y', '--table', '0 8 zero']);
    await ok(sb, ['remove', 'y']);
    expect(await head.exited).toBe(0);
    expect(head.stderr).toBe('');
    // and through a real pipe into head(1)
    const piped = await new Promise<{ code: number | null; out: string }>((resolve) => {
      const sh = spawn('bash', ['-c', `set -o pipefail; '${process.execPath}' '${CLI}' events | head -1`], { cwd: ROOT, env: sb.env });
      let out = '';
      // head has its line: changes after that are lines nobody reads
      sh.stdout.once('data', () => void dmkit(sb, ['create', 'x', '--table', '0 8 zero']).then(() => dmkit(sb, ['remove', 'x'])));
      sh.stdout.on('data', (d: Buffer) => (out += d.toString()));
      sh.stderr.on('data', (d: Buffer) => (out += d.toString()));
      sh.on('close', (code) => resolve({ code, out }));
    });
    expect(piped.code).toBe(0);
    expect(piped.out).toMatch(/^\S+ exists device seq=\d+ name=repl /);
    expect(piped.out.split('\n').filter(Boolean)).toHaveLength(1);
  }, 60_000);
});

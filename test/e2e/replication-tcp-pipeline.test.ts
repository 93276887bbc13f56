/**
 * Pipelined epochs over the `tcp` slink between two real daemons: the sender ships the next
 * epoch without waiting for the previous one's acknowledgements, so an entry that fails at
 * the receiving site has later epochs behind it on the wire. They must not be applied without
 * it (the site would no longer be a prefix of the group's writes): the receiver refuses them
 * until the sender says it starts over (RESTART, after its retest), and the site converges
 * once its device works again.
 *
 * B's receiving device `pv` is an image over sectors 0–8191 and, over 8192–16383, a `delay`
 * whose writes go 8 s late to an `error` device: a write there fails at B long after the
 * sender has pipelined the next epochs behind it (8 s leaves room for the next CLI writes on
 * a loaded machine).
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, dmkit, ok, sandbox, type Sandbox } from '../helpers/daemon.ts';
import { SiteDaemon } from '../helpers/site-daemon.ts';

const SECTORS = 16384; // 8 MiB
const BYTES = SECTORS * 512;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface SiteJson {
  slink: number; stateChar: string;
  lag: { ios: number };
  link: { connection: string; lastError: string | null } | null;
}

let a: Sandbox;
let b: SiteDaemon;

beforeAll(async () => {
  b = await SiteDaemon.start();
});
afterAll(async () => {
  if (a) await cleanup(a);
  await b?.close();
});

function blank(dir: string, name: string, bytes = BYTES): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, '');
  fs.truncateSync(f, bytes);
  return f;
}

/** 4 KiB of recognisable content */
function block(tag: string): Buffer {
  const out = Buffer.alloc(4096);
  for (let o = 0; o < out.length; o += 32) out.write(`${tag}@${o}`.padEnd(32, '.'), o, 'latin1');
  return out;
}

async function site1(): Promise<SiteJson> {
  const out = JSON.parse(await ok(a, ['status', '--json', 'repl'])) as Array<{ lines: Array<{ detail: { sites: SiteJson[] } }> }>;
  return out[0]!.lines[0]!.detail.sites.find((s) => s.slink === 1)!;
}

async function until(cond: () => boolean | Promise<boolean>, what: string, limitMs = 60_000): Promise<void> {
  for (const end = Date.now() + limitMs; ; await sleep(50)) {
    if (await cond()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}; site: ${JSON.stringify(await site1())}; B's log: ${b.logTail()}`);
  }
}

async function write(sector: number, data: Buffer): Promise<void> {
  const w = await dmkit(a, ['io', 'write', 'vol', String(sector * 512)], { input: data });
  expect(w).toMatchObject({ code: 0, stderr: '' });
}

describe('pipelined epochs over tcp', () => {
  it('an entry failing at the site holds the later epochs sent behind it; after a restart the site converges', { timeout: 180_000 }, async () => {
    const img = blank(b.sb.dir, 'pv.img');
    await b.request('create', { name: 'bad', table: `0 8192 error` });
    await b.request('create', { name: 'pv', table: `0 8192 linear ${img} 0\n8192 8192 delay ${img} 8192 0 dm:bad 0 8000` });

    a = sandbox();
    const words = ['1', 'async', 'retest=1', `peer=${b.address}`, `secret=${b.secretFile}`];
    const local = blank(a.dir, 'local.img');
    await ok(a, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${blank(a.dir, 'rlog', 8 << 20)} 0 auto 16384 blockdev 1 0 tcp ${words.length} ${words.join(' ')}`]);
    await ok(a, ['create', 'vol', '--table', `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${local} nolog 0 1 1 pv core 2 64 nosync`]);
    await until(async () => (await site1()).link?.connection === 'connected', 'the link connects');

    // epoch by epoch (each write acknowledged before the next is issued): the first one will fail at B
    await write(0, block('first'));
    await until(async () => (await site1()).lag.ios === 0, 'the first write shipped');
    await write(9000, block('fails at B'));
    await write(100, block('second'));
    await write(200, block('third'));

    // the site refused the later epochs (they were sent before the failure was known) and went down
    await until(() => /entry \d+ not applied: an entry of epoch \d+ failed at this site/.test(b.log()), 'B refuses a later epoch');
    await until(async () => (await site1()).stateChar === 'D', 'the site goes down');
    const during = fs.readFileSync(img);
    expect(during.subarray(0, 4096).equals(block('first'))).toBe(true);
    expect(during.subarray(100 * 512, 100 * 512 + 4096).every((x) => x === 0)).toBe(true); // not applied without the failed write
    expect(during.subarray(200 * 512, 200 * 512 + 4096).every((x) => x === 0)).toBe(true);
    expect(b.log()).not.toMatch(/the sender starts over/); // its retests re-ship the failed write first: it fails again

    // B's device works again: the next retest restarts shipping, and everything arrives in order
    await b.request('load', { name: 'pv', table: `0 ${SECTORS} linear ${img} 0` });
    await b.request('resume', { name: 'pv' });
    await until(async () => {
      const s = await site1();
      return s.stateChar === 'A' && s.lag.ios === 0;
    }, 'the site catches up');
    expect(fs.readFileSync(img).equals(fs.readFileSync(local))).toBe(true);
    expect(fs.readFileSync(img).subarray(9000 * 512, 9000 * 512 + 4096).equals(block('fails at B'))).toBe(true);
    expect(b.log()).toMatch(/the sender starts over at entry \d+; a failed entry no longer holds later epochs back/);
  });
});

/**
 * The replicator through the real daemon, the `dmkit` CLI and its NBD export, with real
 * clients and a real remote NBD server:
 *
 *  (a) "sync mirror + async replication" (the seed's layout): a `mirror` with a `disk`
 *      log under a replicator-dev, written by an NBD client process: both mirror legs and
 *      the site's image end equal to the acknowledged writes;
 *  (b) a replicator-dev as an NBD export for qemu-io (patterns, write -z, discard) and
 *      nbdcopy (a random image copied in): the site's image compared with `cmp`;
 *  (c) the site an nbdkit export (file plugin) reached through the blockdev slink by an
 *      `nbd+unix://` reference: equal after writes; nbdkit killed under writes → the
 *      slink goes D and no write fails; nbdkit started again → caught up, equal.
 *
 * Every image is compared with a model rebuilt from the writers' own ack logs.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ControlClient } from '../../src/daemon/client.ts';
import type { TablesResult } from '../../src/daemon/protocol.ts';
import { expectSameBytes } from '../compliance/helpers.ts';
import { cleanup, client, ok, sandbox, type Sandbox } from '../helpers/daemon.ts';
import { devUri } from '../helpers/daemon-nbd.ts';
import { blankImage, inSync, waitMirror } from '../helpers/mirror.ts';
import { ok as tool, requireTools, run, writeRandomImage } from '../helpers/nbd-tools.ts';
import { startNbdkit, type Nbdkit } from '../helpers/nbdkit.ts';
import { NbdWriter, replay } from '../helpers/nbd-writer.ts';

const LEN = 8192; // sectors per device (4 MiB)
const BYTES = LEN * 512;
const REGION = 128;
const NR = LEN / REGION;

let sb: Sandbox;
let cl: ControlClient;
const kits: Nbdkit[] = [];

beforeAll(async () => {
  requireTools(['nbdkit', 'nbdcopy', 'qemu-io', 'cmp']);
  sb = sandbox();
  await ok(sb, ['daemon']);
  cl = await client(sb);
});
afterAll(async () => {
  cl?.close();
  for (const k of kits) await k.kill();
  await cleanup(sb);
});

const file = (name: string): string => path.join(sb.dir, name);
const blank = (name: string, bytes = BYTES): string => blankImage(sb.dir, name, bytes);

async function statusOf(name: string): Promise<string> {
  const { lines } = await cl.request<TablesResult>('status', { name });
  return lines[0]!.params;
}

/** poll `name`'s status until it matches */
async function waitStatus(name: string, re: RegExp, what: string, limitMs = 30_000): Promise<string> {
  let s = await statusOf(name);
  for (const end = Date.now() + limitMs; !re.test(s); s = await statusOf(name)) {
    if (Date.now() > end) throw new Error(`${name}: not ${what} within ${limitMs} ms: ${s}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  return s;
}

/** a replicator `repl` over ring `rlog` with blockdev slinks 0 and 1 (retested every second) */
async function createGroup(repl: string): Promise<void> {
  const rlog = blank(`${repl}.rlog`, 8192 * 512);
  await ok(sb, ['create', repl, '--table', `0 1 replicator ringbuffer 4 ${rlog} 0 auto 8192 blockdev 1 0 blockdev 2 1 retest=1`]);
}

const caughtUp = (repl: string): Promise<string> => waitStatus(repl, /^0:S,0,0 1:A,0,0 /, 'caught up');

describe('replicator stacked with the daemon, NBD clients and servers', () => {
  it('(a) a mirror with a disk log under a replicator-dev: both legs and the site equal the NBD writes', async () => {
    const [a, b, remote] = [blank('a.img'), blank('b.img'), blank('a-remote.img')];
    const mlog = blank('m0.log', 64 * 1024);
    const dlog = blank('vol-a.slink1.log', 64 * 1024);
    await ok(sb, ['create', 'm0', '--table', `0 ${LEN} mirror disk 2 ${mlog} ${REGION} 2 ${a} 0 ${b} 0 1 handle_errors`]);
    await waitMirror(cl, 'm0', inSync, 'in sync');
    await createGroup('repl-a');
    await ok(sb, ['create', 'vol-a', '--table', `0 ${LEN} replicator-dev dm:repl-a 0 0 1 dm:m0 nolog 0 1 1 ${remote} disk 3 ${dlog} ${REGION} nosync`]);
    expect(await statusOf('vol-a')).toBe(`A,1/1 A,${NR}/${NR}`);

    const writer = new NbdWriter({
      uri: devUri(sb, 'vol-a'), log: file('vol-a.acks'),
      work: { kind: 'random', seed: 11, lanes: 4, blockBytes: 4096, sizeBytes: BYTES, flushEvery: 16 },
    });
    await writer.waitWrites(600);
    const acks = await writer.stop();
    expect(acks.errors).toEqual([]);
    const model = replay(Buffer.alloc(BYTES), acks.writes);

    await caughtUp('repl-a');
    await waitMirror(cl, 'm0', inSync, 'in sync after the writes');
    expect(await statusOf('vol-a')).toBe(`A,1/1 A,${NR}/${NR}`);
    expectSameBytes(fs.readFileSync(a), model, 'mirror leg a');
    expectSameBytes(fs.readFileSync(b), model, 'mirror leg b');
    expectSameBytes(fs.readFileSync(remote), model, 'site image');
    // the table the daemon prints names the stack as given (a live log's `nosync` has done its work)
    const table = await ok(sb, ['table', 'vol-a']);
    expect([`disk 3 ${dlog} ${REGION} nosync`, `disk 2 ${dlog} ${REGION}`].map((log) => `0 ${LEN} replicator-dev dm:repl-a 0 0 1 dm:m0 nolog 0 1 1 ${remote} ${log}\n`)).toContain(table);
    await ok(sb, ['remove', 'vol-a', 'repl-a', 'm0']);
  });

  it('(b) qemu-io patterns and an nbdcopy upload through a replicator-dev reach the site byte for byte', async () => {
    const [local, remote] = [blank('b-local.img'), blank('b-remote.img')];
    await createGroup('repl-b');
    await ok(sb, ['create', 'vol-b', '--table', `0 ${LEN} replicator-dev dm:repl-b 0 0 1 ${local} nolog 0 1 1 ${remote} core 2 ${REGION} nosync`]);
    const uri = devUri(sb, 'vol-b');

    const KiB = 1024;
    const c = (cmd: string): string[] => ['-c', cmd];
    const out = await tool('qemu-io', ['-f', 'raw',
      ...c(`write -P 0xab 0 ${512 * KiB}`), ...c(`write -P 0xcd ${1024 * KiB} ${256 * KiB}`),
      ...c(`write -P 0x11 ${3000 * KiB} ${4 * KiB}`), ...c(`write -z ${64 * KiB} ${64 * KiB}`),
      ...c(`discard ${2048 * KiB} ${512 * KiB}`), ...c('flush'),
      ...c(`read -P 0xab 0 ${64 * KiB}`), ...c(`read -P 0 ${64 * KiB} ${64 * KiB}`), ...c(`read -P 0xab ${128 * KiB} ${384 * KiB}`),
      ...c(`read -P 0xcd ${1024 * KiB} ${256 * KiB}`), ...c(`read -P 0x11 ${3000 * KiB} ${4 * KiB}`),
      uri]);
    expect(out).not.toMatch(/Pattern verification failed|error/i);
    const model = Buffer.alloc(BYTES);
    model.fill(0xab, 0, 512 * KiB);
    model.fill(0xcd, 1024 * KiB, 1280 * KiB);
    model.fill(0x11, 3000 * KiB, 3004 * KiB);
    model.fill(0, 64 * KiB, 128 * KiB);
    await caughtUp('repl-b');
    expectSameBytes(fs.readFileSync(local), model, 'local image after qemu-io');
    expectSameBytes(fs.readFileSync(remote), model, 'site image after qemu-io');

    const src = file('random.img');
    writeRandomImage(src, BYTES);
    await tool('nbdcopy', ['--flush', src, uri]);
    await caughtUp('repl-b');
    expect(await statusOf('vol-b')).toBe(`A,1/1 A,${NR}/${NR}`);
    for (const img of [local, remote]) {
      const r = await run('cmp', [src, img]);
      expect(r.code, `cmp ${src} ${img}: ${r.stdout}${r.stderr}`).toBe(0);
    }
    await ok(sb, ['remove', 'vol-b', 'repl-b']);
  });

  it('(c) the site on an nbdkit export: equal after writes; nbdkit killed under writes → D, writes go on; restarted → caught up, equal', async () => {
    const [local, remote] = [blank('c-local.img'), blank('c-remote.img')];
    const dlog = blank('vol-c.slink1.log', 64 * 1024);
    const sock = file('kit.sock');
    kits.push(await startNbdkit(sock, ['file', remote]));
    const site = `nbd+unix:///?socket=${sock}`;
    await createGroup('repl-c');
    await ok(sb, ['create', 'vol-c', '--table', `0 ${LEN} replicator-dev dm:repl-c 0 0 1 ${local} nolog 0 1 1 ${site} disk 3 ${dlog} ${REGION} nosync`]);

    const first = new NbdWriter({
      uri: devUri(sb, 'vol-c'), log: file('vol-c-1.acks'),
      work: { kind: 'random', seed: 21, lanes: 4, blockBytes: 8192, sizeBytes: BYTES, flushEvery: 32 },
    });
    await first.waitWrites(500);
    const acks1 = await first.stop();
    let model = replay(Buffer.alloc(BYTES), acks1.writes);
    await caughtUp('repl-c');
    expectSameBytes(fs.readFileSync(remote), model, 'nbdkit image after the first writes');

    // nbdkit dies under a running writer: the slink goes down, the writer sees no error
    const second = new NbdWriter({
      uri: devUri(sb, 'vol-c'), log: file('vol-c-2.acks'),
      work: { kind: 'random', seed: 22, lanes: 4, blockBytes: 8192, sizeBytes: BYTES, flushEvery: 0 },
    });
    await second.waitWrites(200);
    await kits.pop()!.kill();
    await waitStatus('repl-c', /^0:S,0,0 1:D,/, 'slink 1 down');
    const atDown = second.acks().writes.length;
    await second.waitWrites(atDown + 300); // writes go on while the site is down
    expect(await statusOf('vol-c')).toMatch(new RegExp(`^A,1/1 D,\\d+/${NR}$`));

    fs.rmSync(sock); // a killed nbdkit leaves its socket behind
    kits.push(await startNbdkit(sock, ['file', remote]));
    await second.waitWrites(second.acks().writes.length + 200);
    const acks2 = await second.stop();
    expect(acks2.errors).toEqual([]);
    model = replay(model, acks2.writes);
    await caughtUp('repl-c');
    await waitStatus('vol-c', new RegExp(`^A,1/1 A,${NR}/${NR}$`), 'in sync');
    expectSameBytes(fs.readFileSync(local), model, 'local image');
    expectSameBytes(fs.readFileSync(remote), model, 'nbdkit image after the restart');
    await ok(sb, ['remove', 'vol-c', 'repl-c']);
  });
});

/**
 * The engine as an NBD client, through the real daemon and CLI: tables that map onto other
 * servers' exports (`nbdkit memory`, `qemu-nbd`), used through dmkit's own NBD export by
 * real clients, and a mirror whose second leg is an `nbdkit file` export, resynced and then
 * written through. Every check reads the remote side independently: the nbdkit export
 * directly, or the file behind nbdkit's file plugin and qemu-nbd.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { cleanup, dmkit, ok as cli, sandbox, type Sandbox } from '../helpers/daemon.ts';
import { devUri, firstDiff, peerServer, sparseFile, type PeerServer } from '../helpers/daemon-nbd.ts';
import { ok, requireTools, writeRandomImage } from '../helpers/nbd-tools.ts';

const MiB = 1024 * 1024;

let sb: Sandbox;
const peers: PeerServer[] = [];

const tmp = (name: string): string => path.join(sb.dir, name);

async function download(uri: string, name = 'download.img'): Promise<Buffer> {
  const out = tmp(name);
  fs.rmSync(out, { force: true });
  await ok('nbdcopy', [uri, out]);
  return fs.readFileSync(out);
}

async function peer(cmd: string, args: string[], socket: string): Promise<PeerServer> {
  const p = await peerServer(cmd, args, socket);
  peers.push(p);
  return p;
}

beforeAll(async () => {
  requireTools(['nbdkit', 'qemu-nbd', 'nbdinfo', 'nbdcopy', 'qemu-io']);
  sb = sandbox();
  await cli(sb, ['daemon']);
});

afterAll(async () => {
  // the daemon first: it flushes its devices into the peers at shutdown
  if (sb) await cleanup(sb);
  for (const p of peers) await p.stop();
});

describe('dmkit maps onto remote NBD exports', { timeout: 60_000 }, () => {
  test('linear over an nbdkit memory export, used through dmkit\'s own export', async () => {
    const mem = await peer('nbdkit', ['-f', '-U', tmp('mem.sock'), 'memory', '64M'], tmp('mem.sock'));
    // 48 MiB of the 64 MiB export, from 8 MiB on
    await cli(sb, ['create', 'remote', '--table', `0 98304 linear ${mem.uri()} 16384`]);
    expect(await cli(sb, ['deps', 'remote'])).toBe(`1 dependencies\t: (${mem.uri()})\n`);
    const uri = devUri(sb, 'remote');
    expect((await ok('nbdinfo', ['--size', uri])).trim()).toBe(String(48 * MiB));
    // allocation passes through: nbdkit memory reports its unwritten space as hole+zero
    expect(JSON.parse(await ok('nbdinfo', ['--map', '--json', uri]))).toEqual([
      { offset: 0, length: 48 * MiB, type: 3, description: 'hole,zero' },
    ]);

    const src = tmp('src.img');
    const data = writeRandomImage(src, 12 * MiB);
    await ok('nbdcopy', ['--flush', src, uri]);
    const model = Buffer.alloc(48 * MiB);
    data.copy(model, 0);
    expect(firstDiff(await download(uri), model), 'through dmkit').toBe(-1);
    const remote = Buffer.alloc(64 * MiB);
    data.copy(remote, 8 * MiB);
    expect(firstDiff(await download(mem.uri(), 'mem.img'), remote), 'nbdkit memory directly').toBe(-1);

    await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6b 40M 1M', '-c', 'write -z 1M 64k', '-c', 'flush', uri]);
    model.fill(0x6b, 40 * MiB, 41 * MiB);
    model.fill(0, MiB, MiB + 65536);
    expect(firstDiff(await download(uri), model), 'through dmkit').toBe(-1);
    remote.fill(0x6b, 48 * MiB, 49 * MiB);
    remote.fill(0, 9 * MiB, 9 * MiB + 65536);
    expect(firstDiff(await download(mem.uri(), 'mem.img'), remote), 'nbdkit memory directly').toBe(-1);
    await cli(sb, ['remove', 'remote']);
  });

  test('linear over a qemu-nbd export of a raw image', async () => {
    const img = tmp('qemu.img');
    const model = Buffer.from(writeRandomImage(img, 8 * MiB));
    const q = await peer('qemu-nbd', ['-k', tmp('q.sock'), '-f', 'raw', img], tmp('q.sock'));
    await cli(sb, ['create', 'qremote', '--table', `0 16384 linear ${q.uri()} 0`]);
    const uri = devUri(sb, 'qremote');
    expect(firstDiff(await download(uri), model)).toBe(-1);
    const out = await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0xa1 3M 512k', '-c', 'aio_write -P 0xa2 7M 64k', '-c', 'aio_flush',
      '-c', 'read -P 0xa1 3M 512k', uri]);
    expect(out).not.toMatch(/verification failed/i);
    model.fill(0xa1, 3 * MiB, 3 * MiB + 512 * 1024);
    model.fill(0xa2, 7 * MiB, 7 * MiB + 65536);
    expect(firstDiff(await download(uri), model)).toBe(-1);
    // dmkit holds qemu-nbd's only client slot (-e 1): remove it before reading the file
    await cli(sb, ['remove', 'qremote']);
    await q.stop();
    expect(firstDiff(fs.readFileSync(img), model), 'the file behind qemu-nbd').toBe(-1);
  });

  test('mirror onto an nbdkit file export: resync to in-sync, then writes reach both legs', async () => {
    const local = tmp('local.img');
    const model = Buffer.from(writeRandomImage(local, 16 * MiB));
    const remoteImg = sparseFile(tmp('remote.img'), 16 * MiB);
    const f = await peer('nbdkit', ['-f', '-U', tmp('file.sock'), 'file', remoteImg], tmp('file.sock'));
    await cli(sb, ['create', 'm', '--table', `0 32768 mirror core 1 1024 2 ${local} 0 ${f.uri()} 0`]);
    const w = await dmkit(sb, ['wait', '--progress', 'm']);
    expect(w.code, w.stderr).toBe(0);
    expect(w.stderr).toMatch(/^(m: resync \d+\/32768 sectors \(\d+%\)\n)*(m: resync 32768\/32768 sectors \(100%\)\n|m: no background work; nothing to wait for\n)$/);
    expect(await cli(sb, ['status', 'm'])).toBe(`0 32768 mirror 2 ${local} ${f.uri()} 32/32 1 AA 1 core\n`);
    expect(firstDiff(fs.readFileSync(remoteImg), model), 'remote leg after resync').toBe(-1);

    // writes through dmkit's export of the mirror land on both legs
    const uri = devUri(sb, 'm');
    const src = tmp('mirror-src.img');
    const data = writeRandomImage(src, 6 * MiB);
    await ok('nbdcopy', ['--flush', src, uri]);
    data.copy(model, 0);
    await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x4d 10M 1M', '-c', 'write -z 12M 256k', '-c', 'flush', uri]);
    model.fill(0x4d, 10 * MiB, 11 * MiB);
    model.fill(0, 12 * MiB, 12 * MiB + 256 * 1024);
    expect(firstDiff(await download(uri), model), 'through dmkit').toBe(-1);
    expect(firstDiff(fs.readFileSync(local), model), 'local leg').toBe(-1);
    expect(firstDiff(fs.readFileSync(remoteImg), model), 'remote leg (nbdkit file)').toBe(-1);
    expect(await cli(sb, ['status', 'm'])).toMatch(/ 32\/32 1 AA 1 core\n$/);
    await cli(sb, ['remove', 'm']);
  });
});

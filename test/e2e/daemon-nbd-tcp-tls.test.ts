/**
 * A daemon that cannot bind its TCP port exits with the reason. The daemon's NBD export on TCP (`dmkit daemon --nbd-listen 127.0.0.1:0`, the port chosen
 * by the kernel and reported by `hello`), then the same device set after a restart with
 * `--tls-psk FILE --tls require`: TLS-PSK clients (nbdinfo, nbdcopy, nbdsh, qemu-img and
 * qemu-io with tls-creds-psk) get in over the Unix socket and TCP, plain clients and a
 * wrong key are refused, and the daemon serves on; and with `--tls on`, both kinds.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { HelloResult } from '../../src/daemon/protocol.ts';
import { cleanup, client, daemonPid, dmkit, ok as cli, sandbox, signalDaemon, type Sandbox } from '../helpers/daemon.ts';
import { devUri, firstDiff, nbdSock, Nbdsh } from '../helpers/daemon-nbd.ts';
import { ok, requireTools, run, writeRandomImage } from '../helpers/nbd-tools.ts';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const KEY = '4e4244a5ca1ab1e0c0ffee00112233445566778899aabbccddeeff0011223344';
const WRONG = '00112233445566778899aabbccddeeff4e4244a5ca1ab1e0c0ffee0011223344';

let sb: Sandbox;
let img: string;
/** what vol must hold */
let model: Buffer;
let pskFile: string;
let wrongFile: string;
/** a directory holding keys.psk, for qemu's tls-creds-psk */
let pskDir: string;

async function tcpPort(): Promise<number> {
  const c = await client(sb);
  try {
    const h = await c.request<HelloResult>('hello');
    expect(h.nbdTcp?.host).toBe('127.0.0.1');
    expect(h.nbdTcp!.port).toBeGreaterThan(0);
    return h.nbdTcp!.port;
  } finally {
    c.close();
  }
}

async function download(uri: string): Promise<Buffer> {
  const out = path.join(sb.dir, 'download.img');
  fs.rmSync(out, { force: true });
  await ok('nbdcopy', [uri, out]);
  return fs.readFileSync(out);
}

beforeAll(async () => {
  requireTools(['nbdinfo', 'nbdcopy', 'nbdsh', 'qemu-img', 'qemu-io']);
  sb = sandbox();
  img = path.join(sb.dir, 'vol.img');
  model = Buffer.from(writeRandomImage(img, SIZE));
  pskFile = path.join(sb.dir, 'alice.psk');
  fs.writeFileSync(pskFile, `alice:${KEY}\n`, { mode: 0o600 });
  wrongFile = path.join(sb.dir, 'wrong.psk');
  fs.writeFileSync(wrongFile, `alice:${WRONG}\n`, { mode: 0o600 });
  pskDir = path.join(sb.dir, 'qemu-psk');
  fs.mkdirSync(pskDir, { mode: 0o700 });
  fs.writeFileSync(path.join(pskDir, 'keys.psk'), `alice:${KEY}\n`, { mode: 0o600 });
});

afterAll(async () => {
  if (sb) await cleanup(sb);
});

describe('NBD over TCP and TLS-PSK through the daemon', { timeout: 60_000 }, () => {
  test('--nbd-listen on a port in use: the daemon fails to start and exits, saying why', async () => {
    const busy = net.createServer();
    await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve));
    const port = (busy.address() as net.AddressInfo).port;
    try {
      const r = await dmkit(sb, ['daemon', '--nbd-listen', `127.0.0.1:${port}`]);
      expect(r.code).toBe(1);
      // the daemon process exited (not: "did not accept connections … within 30 s")
      expect(r.stderr).toMatch(/^dmkit: the daemon did not start \(exit status 1\)/);
      expect(r.stderr).toMatch(/EADDRINUSE/);
    } finally {
      busy.close();
    }
    expect(fs.existsSync(sb.pidFile)).toBe(false);
    expect(fs.existsSync(nbdSock(sb))).toBe(false);
  });

  test('--nbd-listen 127.0.0.1:0: the port is in hello; nbdinfo, nbdcopy and qemu-io work over TCP', async () => {
    await cli(sb, ['daemon', '--nbd-listen', '127.0.0.1:0']);
    await cli(sb, ['create', 'vol', '--table', `0 ${SIZE / 512} linear ${img} 0`]);
    const port = await tcpPort();
    const tcp = `nbd://127.0.0.1:${port}/vol`;
    expect((await ok('nbdinfo', ['--size', tcp])).trim()).toBe(String(SIZE));
    const list = JSON.parse(await ok('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${port}`])) as { exports: Array<{ 'export-name': string }> };
    expect(list.exports.map((e) => e['export-name'])).toEqual(['vol']);
    expect(firstDiff(await download(tcp), model)).toBe(-1);

    await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 64k 128k', '-c', 'flush', tcp]);
    model.fill(0x3c, 64 * 1024, 192 * 1024);
    // the same device on the Unix socket
    expect(firstDiff(await download(devUri(sb, 'vol')), model)).toBe(-1);
    expect(firstDiff(fs.readFileSync(img), model)).toBe(-1);
    await signalDaemon(sb, 'SIGTERM');
  });

  test('--tls require: TLS-PSK clients get in over the Unix socket and TCP, plain ones and a wrong key do not', async () => {
    await cli(sb, ['daemon', '--nbd-listen', '127.0.0.1:0', '--tls-psk', pskFile, '--tls', 'require']);
    const pid = daemonPid(sb);
    const port = await tcpPort();
    const tlsUnix = devUri(sb, 'vol', { user: 'alice', pskFile });
    const tlsTcp = `nbds://alice@127.0.0.1:${port}/vol?tls-psk-file=${pskFile}`;

    const j = JSON.parse(await ok('nbdinfo', ['--json', tlsUnix])) as { TLS: boolean; exports: Array<{ 'export-size': number }> };
    expect(j.TLS).toBe(true);
    expect(j.exports[0]!['export-size']).toBe(SIZE);
    expect((await ok('nbdinfo', ['--size', tlsTcp])).trim()).toBe(String(SIZE));

    for (const plain of [devUri(sb, 'vol'), `nbd://127.0.0.1:${port}/vol`]) {
      const r = await run('nbdinfo', [plain]);
      expect(r.code, plain).not.toBe(0);
      // ERR_TLS_REQD for GO: libnbd words it as nbdkit --tls=require's refusal
      expect(r.stderr).toMatch(/opt_go.*Operation not supported for export: vol/);
    }
    const wrong = await run('nbdinfo', [devUri(sb, 'vol', { user: 'alice', pskFile: wrongFile })]);
    expect(wrong.code).not.toBe(0);
    const nobody = await run('nbdinfo', [devUri(sb, 'vol', { user: 'mallory', pskFile: wrongFile.replace('wrong', 'alice') })]);
    expect(nobody.code).not.toBe(0);

    // data over TLS: nbdcopy up and down, nbdsh
    const src = path.join(sb.dir, 'tls-src.img');
    model = Buffer.from(writeRandomImage(src, SIZE));
    await ok('nbdcopy', ['--flush', src, tlsTcp]);
    expect(firstDiff(await download(tlsUnix), model)).toBe(-1);
    const s = await Nbdsh.connect(tlsUnix);
    try {
      expect(await s.ok('result = h.get_size()')).toBe(SIZE);
      await s.ok('h.pwrite(b"\\x5a" * 8192, 1 << 20, nbd.CMD_FLAG_FUA)');
      model.fill(0x5a, MiB, MiB + 8192);
      expect(await s.ok('result = h.pread(4096, 0)')).toBe(model.subarray(0, 4096).toString('hex'));
    } finally {
      await s.close();
    }
    expect(firstDiff(fs.readFileSync(img), model)).toBe(-1);
    expect(daemonPid(sb)).toBe(pid);
    expect(fs.statSync(nbdSock(sb)).isSocket()).toBe(true);
  });

  test('qemu-img and qemu-io with tls-creds-psk', async () => {
    const obj = ['--object', `tls-creds-psk,id=t0,endpoint=client,dir=${pskDir},username=alice`];
    const opts = (extra = ''): string => `driver=nbd,path=${nbdSock(sb)},export=vol,tls-creds=t0${extra}`;
    const info = JSON.parse(await ok('qemu-img', ['info', '--output=json', ...obj, '--image-opts', opts()])) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(SIZE);

    const out = await ok('qemu-io', [...obj, '--image-opts', opts(), '-c', 'write -P 0xe7 2M 256k', '-c', 'read -P 0xe7 2M 256k', '-c', 'flush']);
    expect(out).not.toMatch(/verification failed/i);
    model.fill(0xe7, 2 * MiB, 2 * MiB + 256 * 1024);

    const conv = path.join(sb.dir, 'tls-convert.img');
    await ok('qemu-img', ['convert', ...obj, '--image-opts', opts(), '-O', 'raw', conv]);
    expect(firstDiff(fs.readFileSync(conv), model)).toBe(-1);

    // without the credentials qemu is refused
    const plain = await run('qemu-img', ['info', `nbd+unix:///vol?socket=${nbdSock(sb)}`]);
    expect(plain.code).not.toBe(0);
    expect(firstDiff(fs.readFileSync(img), model)).toBe(-1);
    expect(await cli(sb, ['ls'])).toMatch(/^vol\t/m);
    await signalDaemon(sb, 'SIGTERM');
  });

  test('--tls on: TLS offered, plain clients still served', async () => {
    await cli(sb, ['daemon', '--tls-psk', pskFile, '--tls', 'on']);
    const tls = JSON.parse(await ok('nbdinfo', ['--json', devUri(sb, 'vol', { user: 'alice', pskFile })])) as { TLS: boolean };
    expect(tls.TLS).toBe(true);
    const plain = JSON.parse(await ok('nbdinfo', ['--json', devUri(sb, 'vol')])) as { TLS: boolean; exports: Array<{ 'export-size': number }> };
    expect(plain.TLS).toBe(false);
    expect(plain.exports[0]!['export-size']).toBe(SIZE);
    expect(firstDiff(await download(devUri(sb, 'vol')), model)).toBe(-1);
  });
});

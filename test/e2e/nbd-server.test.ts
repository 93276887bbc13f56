/**
 * NbdServer in-process on a Unix socket over the file/memory test provider, driven by real
 * clients: nbdinfo, nbdcopy, nbdsh, qemu-img, qemu-io, fio, nbd-client, and TLS-PSK with
 * nbdinfo, nbdcopy and qemu-img. Every scenario ends by comparing the image bytes with a
 * reference model kept by the test.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { NbdServer } from '../../src/nbd/server.ts';
import { TestProvider } from '../helpers/nbd-file-provider.ts';
import { nbdshResults, ok, requireTools, run, sha256, unixUri, writeRandomImage } from '../helpers/nbd-tools.ts';

const MiB = 1024 * 1024;
const DISK_SIZE = 32 * MiB;
const MEM_SIZE = 64 * MiB;
const RO_SIZE = 4 * MiB;

let dir: string;
let sock: string;
let diskPath: string;
let roPath: string;
let provider: TestProvider;
let server: NbdServer;
/** what `disk` must hold, maintained independently of the server */
let model: Buffer;
let memModel: Buffer;
let roDigest: string;

const uri = (name: string): string => unixUri(sock, name);

function expectDiskMatchesModel(): void {
  const actual = readFileSync(diskPath);
  expect(actual.length).toBe(model.length);
  expect(sha256(actual)).toBe(sha256(model));
}

async function expectMemMatchesModel(): Promise<void> {
  const out = join(dir, 'mem-check.img');
  await ok('nbdcopy', [uri('mem'), out]);
  expect(sha256(readFileSync(out))).toBe(sha256(memModel));
  rmSync(out);
}

beforeAll(async () => {
  requireTools(['nbdinfo', 'nbdcopy', 'nbdsh', 'qemu-img', 'qemu-io', 'fio', 'nbd-client']);
  dir = mkdtempSync(join(tmpdir(), 'dmkit-nbd-'));
  sock = join(dir, 'nbd.sock');
  diskPath = join(dir, 'disk.img');
  roPath = join(dir, 'ro.img');
  model = Buffer.from(writeRandomImage(diskPath, DISK_SIZE));
  roDigest = sha256(writeRandomImage(roPath, RO_SIZE));
  memModel = Buffer.alloc(MEM_SIZE);
  provider = new TestProvider([
    { kind: 'file', name: 'disk', path: diskPath, description: 'scratch disk' },
    { kind: 'file', name: 'ro', path: roPath, readOnly: true },
    { kind: 'memory', name: 'mem', size: MEM_SIZE },
  ]);
  server = new NbdServer(provider, {});
  await server.listenUnix(sock);
});

afterAll(async () => {
  await server?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('nbd server with real clients', { timeout: 30_000 }, () => {
  test('the Unix socket is private to its owner', () => {
    expect(statSync(sock).isSocket()).toBe(true);
    expect(statSync(sock).mode & 0o777).toBe(0o600);
  });

  test('nbdinfo: size, flags, block sizes, contexts (--json)', async () => {
    expect((await ok('nbdinfo', ['--size', uri('disk')])).trim()).toBe(String(DISK_SIZE));
    const j = JSON.parse(await ok('nbdinfo', ['--json', uri('disk')]));
    expect(j.protocol).toBe('newstyle-fixed');
    expect(j.structured).toBe(true);
    const e = j.exports[0];
    expect(e['export-name']).toBe('disk');
    expect(e.description).toBe('scratch disk');
    expect(e['export-size']).toBe(DISK_SIZE);
    expect(e.contexts).toContain('base:allocation');
    expect(e).toMatchObject({
      is_read_only: false, can_multi_conn: true, can_flush: true, can_fua: true, can_trim: true,
      can_zero: true, can_fast_zero: true, can_cache: true, can_df: true,
      block_size_minimum: 512, block_size_preferred: 4096, block_size_maximum: 32 * MiB,
    });
    const ro = JSON.parse(await ok('nbdinfo', ['--json', uri('ro')])).exports[0];
    expect(ro.is_read_only).toBe(true);
    expect(ro['export-size']).toBe(RO_SIZE);
  });

  test('nbdinfo --list names every export', async () => {
    const j = JSON.parse(await ok('nbdinfo', ['--list', '--json', uri('')]));
    const names = j.exports.map((e: { 'export-name': string }) => e['export-name']).sort();
    expect(names).toEqual(['disk', 'mem', 'ro']);
    const unknown = await run('nbdinfo', [uri('nope')]);
    expect(unknown.code).not.toBe(0);
  });

  test('nbdcopy uploads and downloads byte-exact (multi-conn)', async () => {
    const src = join(dir, 'src.img');
    const data = writeRandomImage(src, DISK_SIZE);
    await ok('nbdcopy', ['--flush', src, uri('disk')]);
    data.copy(model);
    expectDiskMatchesModel();
    const out = join(dir, 'down.img');
    await ok('nbdcopy', [uri('disk'), out]);
    expect(sha256(readFileSync(out))).toBe(sha256(model));
    // a read-only export downloads too, and is untouched
    await ok('nbdcopy', [uri('ro'), out]);
    expect(sha256(readFileSync(out))).toBe(roDigest);
    rmSync(out);
  });

  test('nbdinfo --map reports holes on the sparse export and data on the file', async () => {
    // write 1 MiB at 1 MiB and 512 KiB at 8 MiB into the memory export
    const a = Buffer.alloc(MiB, 0x5a);
    const b = Buffer.alloc(512 * 1024, 0xa5);
    await nbdshResults(uri('mem'), [], [
      `t("w1", lambda: h.pwrite(b"\\x5a" * ${MiB}, ${MiB}))`,
      `t("w2", lambda: h.pwrite(b"\\xa5" * ${512 * 1024}, ${8 * MiB}))`,
    ].join('\n'));
    a.copy(memModel, MiB);
    b.copy(memModel, 8 * MiB);
    const map = JSON.parse(await ok('nbdinfo', ['--map', '--json', uri('mem')])) as Array<{ offset: number; length: number; type: number }>;
    expect(map).toEqual([
      { offset: 0, length: MiB, type: 3, description: 'hole,zero' },
      { offset: MiB, length: MiB, type: 0, description: 'data' },
      { offset: 2 * MiB, length: 6 * MiB, type: 3, description: 'hole,zero' },
      { offset: 8 * MiB, length: 512 * 1024, type: 0, description: 'data' },
      { offset: 8.5 * MiB, length: MEM_SIZE - 8.5 * MiB, type: 3, description: 'hole,zero' },
    ]);
    const diskMap = JSON.parse(await ok('nbdinfo', ['--map', '--json', uri('disk')]));
    expect(diskMap).toEqual([{ offset: 0, length: DISK_SIZE, type: 0, description: 'data' }]);
    await expectMemMatchesModel();
  });

  test('qemu-img info, compare, map and convert both ways', async () => {
    const info = JSON.parse(await ok('qemu-img', ['info', '--output=json', uri('disk')]));
    expect(info['virtual-size']).toBe(DISK_SIZE);
    const ref = join(dir, 'ref.img');
    writeFileSync(ref, model);
    expect(await ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ref, uri('disk')])).toMatch(/identical/);
    const out = join(dir, 'conv.img');
    await ok('qemu-img', ['convert', '-O', 'raw', uri('disk'), out]);
    expect(sha256(readFileSync(out))).toBe(sha256(model));
    // upload a new image with parallel writes, then compare
    const src = join(dir, 'src2.img');
    const data = writeRandomImage(src, DISK_SIZE);
    await ok('qemu-img', ['convert', '-n', '-W', '-f', 'raw', '-O', 'raw', src, uri('disk')]);
    data.copy(model);
    expectDiskMatchesModel();
    const map = JSON.parse(await ok('qemu-img', ['map', '--output=json', uri('mem')])) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
    expect(map.find((m) => m.start === MiB)).toMatchObject({ length: MiB, data: true, zero: false });
    expect(map.find((m) => m.start === 0)).toMatchObject({ length: MiB, data: false, zero: true });
    for (const f of [ref, out, src]) rmSync(f);
  });

  test('qemu-io: pattern writes and reads, write -z, discard, flush, aio_write', async () => {
    const out = await ok('qemu-io', [
      '-f', 'raw',
      '-c', 'write -P 0xab 0 1M',
      '-c', 'read -P 0xab 0 1M',
      '-c', 'write -z 1M 1M',
      '-c', 'read -P 0 1M 1M',
      '-c', 'discard 3M 1M',
      '-c', 'flush',
      '-c', 'aio_write -P 0xcd 4M 64k',
      '-c', 'aio_write -P 0xce 5M 64k',
      '-c', 'aio_flush',
      '-c', 'read -P 0xcd 4M 64k',
      '-c', 'read -P 0xce 5M 64k',
      uri('disk'),
    ]);
    expect(out).not.toMatch(/Pattern verification failed|error|failed/i);
    model.fill(0xab, 0, MiB);
    model.fill(0, MiB, 2 * MiB);
    model.fill(0xcd, 4 * MiB, 4 * MiB + 64 * 1024);
    model.fill(0xce, 5 * MiB, 5 * MiB + 64 * 1024);
    // discard is advisory: the file provider keeps the old bytes, so the model does too
    expectDiskMatchesModel();
  });

  test('nbdsh: every command, FUA, pipelined aio', async () => {
    const r = await nbdshResults(uri('disk'), ['--base-allocation'], `
t("pwrite", lambda: h.pwrite(b"\\x11" * 4096, 8192))
t("pwrite_fua", lambda: h.pwrite(b"\\x22" * 4096, 12288, nbd.CMD_FLAG_FUA))
def check():
    assert h.pread(8192, 8192) == b"\\x11" * 4096 + b"\\x22" * 4096
t("pread", check)
t("pread_df", lambda: h.pread(1048576, 0, nbd.CMD_FLAG_DF))
t("flush", lambda: h.flush())
t("zero_nohole", lambda: h.zero(4096, 16384, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA))
t("trim", lambda: h.trim(65536, 65536 * 4))
t("cache", lambda: h.cache(4096, 0))
def bs():
    ext = []
    h.block_status(65536, 0, lambda ctx, off, e, err: ext.extend(e))
    assert ext == [65536, 0], ext
t("block_status", bs)
def bs1():
    ext = []
    h.block_status(65536, 0, lambda ctx, off, e, err: ext.extend(e), nbd.CMD_FLAG_REQ_ONE)
    assert len(ext) == 2 and ext[0] <= 65536, ext
t("block_status_req_one", bs1)
def wait(cookies):
    pending = list(cookies)
    while True:
        pending = [c for c in pending if not h.aio_command_completed(c)]
        if not pending:
            return
        h.poll(-1)
def aio():
    bufs = [nbd.Buffer(4096) for i in range(64)]
    wait([h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 4096), 1048576 + i * 4096) for i in range(64)])
    wait([h.aio_pread(bufs[i], 1048576 + i * 4096) for i in range(64)])
    for i in range(64):
        assert bufs[i].to_bytearray() == bytearray([i]) * 4096, i
t("aio", aio)
`);
    for (const [k, v] of Object.entries(r)) expect(`${k}=${v}`).toBe(`${k}=OK`);
    model.fill(0x11, 8192, 12288);
    model.fill(0x22, 12288, 16384);
    model.fill(0, 16384, 20480);
    for (let i = 0; i < 64; i++) model.fill(i, MiB + i * 4096, MiB + (i + 1) * 4096);
    expectDiskMatchesModel();
  });

  test('nbdsh: protocol errors map to the right errno and change nothing', async () => {
    const r = await nbdshResults(uri('disk'), [], `
sz = h.get_size()
t("unaligned_offset", lambda: h.pread(512, 1))
t("unaligned_length", lambda: h.pread(100, 0))
t("unaligned_write", lambda: h.pwrite(b"x" * 512, 3))
t("read_past_end", lambda: h.pread(1024, sz - 512))
t("trim_past_end", lambda: h.trim(1024, sz - 512))
t("cache_past_end", lambda: h.cache(1024, sz - 512))
t("write_past_end", lambda: h.pwrite(b"x" * 1024, sz - 512))
t("zero_past_end", lambda: h.zero(1024, sz - 512))
t("fast_zero", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
t("unknown_flag", lambda: h.pread(512, 0, 1 << 9))
t("flag_on_wrong_command", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_REQ_ONE))
t("read_too_big", lambda: h.pread(33 * 1024 * 1024, 0))
t("still_alive", lambda: h.pread(512, 0))
`);
    expect(r).toEqual({
      unaligned_offset: 'EINVAL', unaligned_length: 'EINVAL', unaligned_write: 'EINVAL',
      read_past_end: 'EINVAL', trim_past_end: 'EINVAL', cache_past_end: 'EINVAL',
      write_past_end: 'ENOSPC', zero_past_end: 'ENOSPC', fast_zero: 'ENOTSUP',
      unknown_flag: 'EINVAL', flag_on_wrong_command: 'EINVAL',
      read_too_big: expect.stringMatching(/^(EINVAL|EOVERFLOW)$/), still_alive: 'OK',
    });
    const ro = await nbdshResults(uri('ro'), [], `
t("write", lambda: h.pwrite(b"x" * 512, 0))
t("trim", lambda: h.trim(512, 0))
t("zero", lambda: h.zero(512, 0))
t("read", lambda: h.pread(512, 0))
t("flush", lambda: h.flush())
`);
    expect(ro).toEqual({ write: 'EPERM', trim: 'EPERM', zero: 'EPERM', read: 'OK', flush: 'OK' });
    expectDiskMatchesModel();
    expect(sha256(readFileSync(roPath))).toBe(roDigest);
  });

  test('fio nbd engine: random read/write at iodepth 32 with crc32c verify', async () => {
    const out = await ok('fio', [
      '--name=nbd', '--ioengine=nbd', `--uri=${uri('disk')}`, '--rw=randrw', '--bs=4k',
      '--iodepth=32', '--size=8M', '--io_size=16M', '--verify=crc32c', '--do_verify=1',
      '--runtime=20', '--output-format=json', '--verify_state_save=0',
    ], { timeoutMs: 40_000 });
    const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
    expect(job.error).toBe(0);
    expect(job.read.io_bytes + job.write.io_bytes).toBeGreaterThan(0);
    // fio wrote its own patterns into the first 8 MiB and verified them; take them into the model
    readFileSync(diskPath).copy(model, 0, 0, 8 * MiB);
    expectDiskMatchesModel();
  });

  test('nbd-client (kernel path): GO without SR completes, then the missing module stops it', async () => {
    const before = server.stats.go;
    const r = await run('nbd-client', ['-N', 'disk', '-u', sock, '/dev/nbd0'], { timeoutMs: 15_000 });
    expect(r.code).not.toBe(0);
    expect(`${r.stdout}${r.stderr}`).toMatch(/size = 32MB/);
    expect(server.stats.go).toBe(before + 1);
  });

  test('connections are released after every client', async () => {
    for (let i = 0; i < 50 && (server.connections > 0 || provider.openHandles > 0); i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(server.connections).toBe(0);
    expect(provider.openHandles).toBe(0);
  });
});

describe('nbd server with TLS-PSK', { timeout: 30_000 }, () => {
  let tlsServer: NbdServer;
  let optServer: NbdServer;
  let tlsSock: string;
  let optSock: string;
  let pskDir: string;
  let pskFile: string;
  let badPskFile: string;
  const key = 'c0ffee00112233445566778899aabbccddeeff00112233445566778899aabbcc';

  beforeAll(async () => {
    pskDir = join(dir, 'psk');
    rmSync(pskDir, { recursive: true, force: true });
    mkdirSync(pskDir);
    pskFile = join(pskDir, 'keys.psk');
    writeFileSync(pskFile, `# test keys\nalice:${key}\n`, { mode: 0o600 });
    badPskFile = join(dir, 'bad.psk');
    writeFileSync(badPskFile, `alice:${'00'.repeat(32)}\n`, { mode: 0o600 });
    tlsSock = join(dir, 'tls.sock');
    optSock = join(dir, 'opt.sock');
    tlsServer = new NbdServer(provider, { tls: { pskFile, require: true } });
    await tlsServer.listenUnix(tlsSock);
    optServer = new NbdServer(provider, { tls: { pskFile, require: false } });
    await optServer.listenUnix(optSock);
  });

  afterAll(async () => {
    await tlsServer?.close();
    await optServer?.close();
  });

  const tlsUri = (s: string, name: string, psk = pskFile): string => unixUri(s, name, { user: 'alice', pskFile: psk });

  test('nbdinfo and nbdcopy over STARTTLS with a PSK', async () => {
    const j = JSON.parse(await ok('nbdinfo', ['--json', tlsUri(tlsSock, 'disk')]));
    expect(j.TLS).toBe(true);
    expect(j.exports[0]['export-size']).toBe(DISK_SIZE);
    expect(j.exports[0].contexts).toContain('base:allocation');
    const out = join(dir, 'tls-down.img');
    await ok('nbdcopy', [tlsUri(tlsSock, 'disk'), out]);
    expect(sha256(readFileSync(out))).toBe(sha256(model));
    rmSync(out);
    expect(tlsServer.stats.tls).toBeGreaterThanOrEqual(2);
  });

  test('qemu-img over TLS-PSK (tls-creds-psk object)', async () => {
    const creds = `tls-creds-psk,id=t0,endpoint=client,dir=${pskDir},username=alice`;
    const info = JSON.parse(await ok('qemu-img', [
      'info', '--output=json', '--object', creds, '--image-opts', `driver=nbd,path=${tlsSock},export=disk,tls-creds=t0`,
    ]));
    expect(info['virtual-size']).toBe(DISK_SIZE);
    const ref = join(dir, 'tls-ref.img');
    writeFileSync(ref, model);
    const cmp = await ok('qemu-img', [
      'compare', '--object', creds, '--image-opts', `driver=file,filename=${ref}`, `driver=nbd,path=${tlsSock},export=disk,tls-creds=t0`,
    ]);
    expect(cmp).toMatch(/identical/);
    rmSync(ref);
  });

  test('TLS required: a plaintext client is refused, a wrong key fails, the server keeps serving', async () => {
    const goBefore = tlsServer.stats.go;
    const plain = await run('nbdinfo', [unixUri(tlsSock, 'disk')]);
    expect(plain.code).not.toBe(0);
    const wrongKey = await run('nbdinfo', [tlsUri(tlsSock, 'disk', badPskFile)]);
    expect(wrongKey.code).not.toBe(0);
    expect(tlsServer.stats.go).toBe(goBefore);
    expect((await ok('nbdinfo', ['--size', tlsUri(tlsSock, 'disk')])).trim()).toBe(String(DISK_SIZE));
    expect(tlsServer.stats.go).toBe(goBefore + 1);
  });

  test('TLS optional: both plaintext and TLS clients are served', async () => {
    expect(JSON.parse(await ok('nbdinfo', ['--json', unixUri(optSock, 'ro')])).TLS).toBe(false);
    expect(JSON.parse(await ok('nbdinfo', ['--json', tlsUri(optSock, 'ro')])).TLS).toBe(true);
    expect(sha256(readFileSync(roPath))).toBe(roDigest);
    expectDiskMatchesModel();
  });
});

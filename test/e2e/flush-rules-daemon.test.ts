/**
 * dm's per-target flush rule through the real daemon: `error` takes no flush, so an NBD
 * client's FLUSH of a device whose table is `error` only, or `linear + error`, succeeds
 * (qemu-io, nbdsh, `dmkit io flush` all exit 0), while writes to the error part fail with
 * EIO and writes to the linear part land in the image.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { cleanup, dmkit, ok as cli, sandbox, type Sandbox } from '../helpers/daemon.ts';
import { devUri, sparseFile } from '../helpers/daemon-nbd.ts';
import { nbdshResults, ok, requireTools, run } from '../helpers/nbd-tools.ts';

const KiB = 1024;
const IMG = 1024 * KiB;

let sb: Sandbox;
let img: string;

beforeAll(async () => {
  requireTools(['nbdsh', 'qemu-io']);
  sb = sandbox();
  img = sparseFile(path.join(sb.dir, 'a.img'), IMG);
  await cli(sb, ['daemon']);
  await cli(sb, ['create', 'err', '--table', '0 2048 error']);
  // [0, 1 MiB) linear on a.img, [1 MiB, 1.5 MiB) error
  await cli(sb, ['create', 'mixed', '--table', `0 2048 linear ${img} 0\n2048 1024 error`]);
});

afterAll(async () => {
  if (sb) await cleanup(sb);
});

describe('flush of a device with error lines through the daemon', { timeout: 60_000 }, () => {
  test('qemu-io flush of an error-only device exits 0; its reads and writes fail', async () => {
    await ok('qemu-io', ['-f', 'raw', '-c', 'flush', devUri(sb, 'err')]);
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4k', devUri(sb, 'err')]);
    expect(w.stdout + w.stderr).toMatch(/Input\/output error/);
  });

  test('nbdsh: FLUSH succeeds on both devices, writes to the error part get EIO', async () => {
    expect(await nbdshResults(devUri(sb, 'err'), [], [
      't("flush", lambda: h.flush())',
      't("write", lambda: h.pwrite(b"\\x01" * 4096, 0))',
      't("read", lambda: h.pread(4096, 0))',
    ].join('\n'))).toEqual({ flush: 'OK', write: 'EIO', read: 'EIO' });
    expect(await nbdshResults(devUri(sb, 'mixed'), [], [
      't("write-linear", lambda: h.pwrite(b"\\x5a" * 8192, 4096))',
      't("flush", lambda: h.flush())',
      't("write-error", lambda: h.pwrite(b"\\x01" * 4096, 1024 * 1024))',
      't("fua-linear", lambda: h.pwrite(b"\\xa5" * 4096, 65536, nbd.CMD_FLAG_FUA))',
      't("flush-again", lambda: h.flush())',
    ].join('\n'))).toEqual({ 'write-linear': 'OK', flush: 'OK', 'write-error': 'EIO', 'fua-linear': 'OK', 'flush-again': 'OK' });
    const bytes = fs.readFileSync(img);
    expect(bytes.subarray(4096, 4096 + 8192).every((b) => b === 0x5a)).toBe(true);
    expect(bytes.subarray(65536, 65536 + 4096).every((b) => b === 0xa5)).toBe(true);
    expect(bytes.subarray(0, 4096).every((b) => b === 0)).toBe(true);
  });

  test('dmkit io flush exits 0 on both devices', async () => {
    for (const name of ['err', 'mixed']) {
      expect(await dmkit(sb, ['io', 'flush', name])).toMatchObject({ code: 0, stderr: '' });
    }
  });
});

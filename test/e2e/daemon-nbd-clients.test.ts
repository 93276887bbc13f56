/**
 * Real NBD clients against the real daemon: a stacked table (linear over striped over two
 * sparse image files, with a zero target segment in the middle) exported on
 * `<runtime>/nbd.sock` and driven by nbdinfo (size, --list, --map), nbdcopy, qemu-img,
 * qemu-io, fio, and nbdsh with strict mode off for the error cases. After every scenario the export is read back and compared with a model
 * of the device kept by the test, and each backing image file with an independent model of
 * the striping.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { cleanup, ok as cli, sandbox, type Sandbox } from '../helpers/daemon.ts';
import { devUri, firstDiff, nbdSock, Nbdsh, scatterStripes, sparseFile } from '../helpers/daemon-nbd.ts';
import { ok, requireTools, run, writeRandomImage } from '../helpers/nbd-tools.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const IMG = 8 * MiB;
const CHUNK = 128; // sectors: 64 KiB
/** vol: [0, 8M) stripe@1M, [8M, 10M) zero, [10M, 14M) stripe@10M */
const VOL_SECTORS = 28672;
const VOL = VOL_SECTORS * 512;
const ZERO_AT = 8 * MiB;
const ZERO_LEN = 2 * MiB;
const SEGMENTS = [
  { start: 0, sectors: 16384, stripeAt: 2048 },
  { start: 20480, sectors: 8192, stripeAt: 20480 },
];

let sb: Sandbox;
let s0: string;
let s1: string;
/** what vol must read as; the zero segment always stays zero */
let model: Buffer;

const uri = (name: string): string => devUri(sb, name);
const tmp = (name: string): string => path.join(sb.dir, name);

/** the stripe device's expected content is vol's linear segments, placed per the table */
function expectBackingFilesMatchModel(): void {
  const stripe = Buffer.alloc(2 * IMG);
  for (const s of SEGMENTS) model.copy(stripe, s.stripeAt * 512, s.start * 512, (s.start + s.sectors) * 512);
  const want = [Buffer.alloc(IMG), Buffer.alloc(IMG)];
  scatterStripes(want, CHUNK, 0, stripe);
  for (const [i, file] of [s0, s1].entries()) {
    const got = fs.readFileSync(file);
    expect(firstDiff(got, want[i]!), `${file}: first differing sector`).toBe(-1);
  }
}

async function expectExportMatchesModel(): Promise<void> {
  const out = tmp('download.img');
  fs.rmSync(out, { force: true });
  await ok('nbdcopy', [uri('vol'), out]);
  const got = fs.readFileSync(out);
  expect(got.length).toBe(VOL);
  expect(firstDiff(got, model), 'vol: first differing sector').toBe(-1);
}

/** apply a write at byte `offset` to the model, dropping what falls in the zero segment */
function modelWrite(offset: number, data: Buffer): void {
  data.copy(model, offset);
  model.fill(0, ZERO_AT, ZERO_AT + ZERO_LEN);
}

interface MapExtent { offset: number; length: number; type: number }
async function map(name: string): Promise<Array<[number, number, number]>> {
  const j = JSON.parse(await ok('nbdinfo', ['--map', '--json', uri(name)])) as MapExtent[];
  return j.map((e) => [e.offset, e.length, e.type]);
}

beforeAll(async () => {
  requireTools(['nbdinfo', 'nbdcopy', 'nbdsh', 'qemu-img', 'qemu-io', 'fio']);
  sb = sandbox();
  s0 = sparseFile(tmp('s0.img'), IMG);
  s1 = sparseFile(tmp('s1.img'), IMG);
  model = Buffer.alloc(VOL);
  await cli(sb, ['daemon']);
  await cli(sb, ['create', 'stripe', '--table', `0 ${(2 * IMG) / 512} striped 2 ${CHUNK} ${s0} 0 ${s1} 0`]);
  await cli(sb, ['create', 'vol', '--table', [
    '0 16384 linear dm:stripe 2048',
    '16384 4096 zero',
    '20480 8192 linear dm:stripe 20480',
  ].join('\n')]);
  await cli(sb, ['create', 'spare', '--notable']);
});

afterAll(async () => {
  if (sb) await cleanup(sb);
});

describe('the daemon exports a stacked table to real clients', { timeout: 60_000 }, () => {
  test('the NBD socket is in the runtime dir, private to its owner', () => {
    const st = fs.statSync(nbdSock(sb));
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o600);
  });

  test('nbdinfo: size, and --list shows the active devices with their sizes', async () => {
    expect((await ok('nbdinfo', ['--size', uri('vol')])).trim()).toBe(String(VOL));
    const list = JSON.parse(await ok('nbdinfo', ['--list', '--json', uri('')])) as { exports: Array<Record<string, unknown>> };
    const shown = list.exports.map((e) => [e['export-name'], e['export-size']]);
    expect(shown.sort()).toEqual([['stripe', 2 * IMG], ['vol', VOL]]);
    // a device without a live table is no export
    const r = await run('nbdinfo', [uri('spare')]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/spare/);
  });

  test('nbdinfo --map: the zero segment and unwritten sparse regions are holes, written ranges data', async () => {
    expect(await map('vol')).toEqual([[0, VOL, 3]]);
    const w = (off: number, len: number, p: number): string[] => ['-c', `write -P ${p} ${off} ${len}`];
    await ok('qemu-io', ['-f', 'raw',
      ...w(MiB, MiB, 0x5a), ...w(ZERO_AT - 512 * KiB, 512 * KiB, 0x5b),
      ...w(ZERO_AT + 512 * KiB, 512 * KiB, 0x5c), ...w(ZERO_AT + ZERO_LEN, 512 * KiB, 0x5d), uri('vol')]);
    modelWrite(MiB, Buffer.alloc(MiB, 0x5a));
    modelWrite(ZERO_AT - 512 * KiB, Buffer.alloc(512 * KiB, 0x5b));
    modelWrite(ZERO_AT + ZERO_LEN, Buffer.alloc(512 * KiB, 0x5d));
    expect(await map('vol')).toEqual([
      [0, MiB, 3],
      [MiB, MiB, 0],
      [2 * MiB, ZERO_AT - 512 * KiB - 2 * MiB, 3],
      [ZERO_AT - 512 * KiB, 512 * KiB, 0],
      [ZERO_AT, ZERO_LEN, 3], // the zero target, written or not
      [ZERO_AT + ZERO_LEN, 512 * KiB, 0],
      [ZERO_AT + ZERO_LEN + 512 * KiB, VOL - ZERO_AT - ZERO_LEN - 512 * KiB, 3],
    ]);
    await expectExportMatchesModel();
    expectBackingFilesMatchModel();
  });

  test('nbdcopy: upload a random image, download it, compare export and backing files', async () => {
    const src = tmp('random.img');
    modelWrite(0, writeRandomImage(src, VOL));
    await ok('nbdcopy', ['--flush', src, uri('vol')]);
    await expectExportMatchesModel();
    expectBackingFilesMatchModel();
    expect(await map('vol')).toEqual([[0, ZERO_AT, 0], [ZERO_AT, ZERO_LEN, 3], [ZERO_AT + ZERO_LEN, VOL - ZERO_AT - ZERO_LEN, 0]]);
  });

  test('qemu-img: compare with the model, convert out of and into the export', async () => {
    const want = tmp('model.img');
    fs.writeFileSync(want, model);
    expect((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', want, uri('vol')])).code).toBe(0);
    const info = await ok('qemu-img', ['info', '--output=json', uri('vol')]);
    expect(JSON.parse(info)['virtual-size']).toBe(VOL);

    const out = tmp('converted.img');
    await ok('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri('vol'), out]);
    expect(firstDiff(fs.readFileSync(out), model)).toBe(-1);

    const src = tmp('random2.img');
    const data = writeRandomImage(src, VOL);
    await ok('qemu-img', ['convert', '-n', '-W', '-f', 'raw', '-O', 'raw', src, uri('vol')]);
    modelWrite(0, data);
    // the export differs from the source exactly in the zero segment
    const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri('vol')]);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`Content mismatch at offset ${ZERO_AT}!`));
    await expectExportMatchesModel();
    expectBackingFilesMatchModel();
  });

  test('qemu-io: pattern writes and reads, write -z, discard, flush, aio, and the zero segment', async () => {
    const c = (cmd: string): string[] => ['-c', cmd];
    const out = await ok('qemu-io', ['-f', 'raw',
      ...c(`write -P 0xab 0 ${MiB}`), ...c(`read -P 0xab 0 ${MiB}`),
      ...c(`write -z ${MiB} ${MiB}`), ...c(`read -P 0 ${MiB} ${MiB}`),
      ...c(`discard ${2 * MiB} ${MiB}`),
      ...c(`write -P 0x11 ${2 * MiB} ${MiB}`), // rewrite the discarded range: its content was undefined
      ...c('flush'),
      ...c(`aio_write -P 0xcd ${4 * MiB} 64k`), ...c(`aio_write -P 0xce ${4 * MiB + 64 * KiB} 64k`), ...c('aio_flush'),
      ...c(`read -P 0xcd ${4 * MiB} 64k`), ...c(`read -P 0xce ${4 * MiB + 64 * KiB} 64k`),
      ...c(`write -P 0x77 ${ZERO_AT} 64k`), ...c(`read -P 0 ${ZERO_AT} 64k`),
      ...c(`write -P 0x99 ${VOL - 4 * KiB} 4k`), ...c(`read -P 0x99 ${VOL - 4 * KiB} 4k`),
      uri('vol')]);
    expect(out).not.toMatch(/Pattern verification failed|error/i);
    modelWrite(0, Buffer.alloc(MiB, 0xab));
    modelWrite(MiB, Buffer.alloc(MiB, 0));
    modelWrite(2 * MiB, Buffer.alloc(MiB, 0x11));
    modelWrite(4 * MiB, Buffer.alloc(64 * KiB, 0xcd));
    modelWrite(4 * MiB + 64 * KiB, Buffer.alloc(64 * KiB, 0xce));
    modelWrite(VOL - 4 * KiB, Buffer.alloc(4 * KiB, 0x99));
    await expectExportMatchesModel();
    expectBackingFilesMatchModel();
  });

  test('nbdsh (strict mode off): bad requests get the mapped errors and change nothing', async () => {
    const s = await Nbdsh.connect(uri('vol'));
    try {
      const tries = {
        readPastEnd: await s.run(`h.pread(4096, ${VOL - 2048})`),
        writePastEnd: await s.run(`h.pwrite(b"\\x01" * 4096, ${VOL - 2048})`),
        zeroPastEnd: await s.run(`h.zero(4096, ${VOL})`),
        trimPastEnd: await s.run(`h.trim(4096, ${VOL})`),
        unalignedRead: await s.run('h.pread(512, 100)'),
        unalignedWrite: await s.run('h.pwrite(b"\\x01" * 700, 4096)'),
        fastZero: await s.run('h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)'),
        unknownFlag: await s.run('h.pwrite(b"\\x01" * 512, 0, 1 << 9)'),
      };
      expect(Object.fromEntries(Object.entries(tries).map(([k, r]) => [k, r.ok ? 'OK' : r.errno]))).toEqual({
        readPastEnd: 'EINVAL', writePastEnd: 'ENOSPC', zeroPastEnd: 'ENOSPC', trimPastEnd: 'EINVAL',
        unalignedRead: 'EINVAL', unalignedWrite: 'EINVAL', fastZero: 'ENOTSUP', unknownFlag: 'EINVAL',
      });
      // the connection is still good: a write that straddles the zero segment
      await s.ok(`h.pwrite(b"\\x42" * 131072, ${ZERO_AT - 65536}, nbd.CMD_FLAG_FUA); h.flush()`);
      expect(await s.ok(`result = h.pread(131072, ${ZERO_AT - 65536})`)).toBe(
        Buffer.concat([Buffer.alloc(65536, 0x42), Buffer.alloc(65536)]).toString('hex'));
    } finally {
      await s.close();
    }
    modelWrite(ZERO_AT - 65536, Buffer.alloc(131072, 0x42));
    await expectExportMatchesModel();
    expectBackingFilesMatchModel();
  });

  test('fio --ioengine=nbd randrw at iodepth 32 with crc32c verification', async () => {
    const cwd = fs.mkdtempSync(path.join(sb.dir, 'fio-'));
    const r = await run('sh', ['-c', `cd '${cwd}' && exec fio --name=dmkit --ioengine=nbd --uri='${uri('vol')}' \
      --rw=randrw --bs=4k --iodepth=32 --offset=${MiB} --size=${6 * MiB} --verify=crc32c --verify_state_save=0 \
      --randseed=1234 --output-format=json`], { timeoutMs: 45_000 });
    expect(r.code, r.stderr).toBe(0);
    const job = (JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: Array<{ error: number; write: { io_bytes: number }; read: { io_bytes: number } }> }).jobs[0]!;
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBeGreaterThan(0);
    expect(job.read.io_bytes).toBeGreaterThan(0);
    // fio's data is not modelled: take the export's bytes in that range and check that
    // the backing files hold exactly them, and nothing outside the range changed
    const got = tmp('after-fio.img');
    await ok('nbdcopy', [uri('vol'), got]);
    const bytes = fs.readFileSync(got);
    bytes.copy(model, MiB, MiB, 7 * MiB);
    expect(firstDiff(bytes, model)).toBe(-1);
    expectBackingFilesMatchModel();
  });
});

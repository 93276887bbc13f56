/**
 * The daemon killed under an NBD client, and stopped with NBD I/O queued:
 *
 * - SIGKILL while nbdsh writes 64 KiB blocks round and round a stacked device (linear over
 *   striped over two files), each write followed by a flush: after a restart through the
 *   CLI the devices are back, every write whose flush was answered is in the backing
 *   files (checked against an independent model of the striping), the one in flight is
 *   old or new per sector, nothing else changed, and clients reconnect.
 * - SIGTERM with a write queued on a suspended device: the client gets ESHUTDOWN, the
 *   daemon stops in order, and the device comes back suspended, writable after resume.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { cleanup, daemonPid, dmkit, ok as cli, sandbox, sandboxDaemon, signalDaemon, waitGone, type Sandbox } from '../helpers/daemon.ts';
import { devUri, firstDiff, Nbdsh, scatterStripes, sparseFile, streaming } from '../helpers/daemon-nbd.ts';
import { ok, requireTools } from '../helpers/nbd-tools.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const IMG = 4 * MiB;
const CHUNK = 64; // sectors
const BLOCK = 64 * KiB;
const BLOCKS = 2 * IMG / BLOCK; // the whole of w
const KILL_AFTER = 160; // past the first pass over the blocks

let sb: Sandbox;
let s0: string;
let s1: string;
/** what w must hold */
const model = Buffer.alloc(2 * IMG);

/** write k's byte, as the writer script makes it; write k goes to block k mod BLOCKS */
const fillOf = (k: number): number => (k * 37 + 11) & 255;

/** writes round and round over w until it is cut off, printing k once write k is flushed */
const WRITER = `
k = 0
while True:
    h.pwrite(bytes([(k * 37 + 11) & 255]) * ${BLOCK}, (k % ${BLOCKS}) * ${BLOCK})
    h.flush()
    print(k, flush=True)
    k += 1
`;

function backingFiles(): Buffer[] {
  return [fs.readFileSync(s0), fs.readFileSync(s1)];
}

function expectedFiles(device: Buffer): Buffer[] {
  const want = [Buffer.alloc(IMG), Buffer.alloc(IMG)];
  scatterStripes(want, CHUNK, 0, device);
  return want;
}

beforeAll(async () => {
  requireTools(['nbdinfo', 'nbdcopy', 'nbdsh']);
  sb = sandbox();
  s0 = sparseFile(path.join(sb.dir, 's0.img'), IMG);
  s1 = sparseFile(path.join(sb.dir, 's1.img'), IMG);
  await cli(sb, ['daemon']);
  await cli(sb, ['create', 'base', '--table', `0 ${(2 * IMG) / 512} striped 2 ${CHUNK} ${s0} 0 ${s1} 0`]);
  await cli(sb, ['create', 'w', '--table', `0 ${(2 * IMG) / 512} linear dm:base 0`]);
});

afterAll(async () => {
  if (sb) await cleanup(sb);
});

describe('daemon killed or stopped under NBD clients', { timeout: 60_000 }, () => {
  test('SIGKILL while nbdsh writes and flushes: restart via the CLI, every flushed write intact', async () => {
    const writer = streaming('nbdsh', ['-u', devUri(sb, 'w'), '-c', WRITER]);
    await writer.until((l) => l.length >= KILL_AFTER);
    const pid = await signalDaemon(sb, 'SIGKILL');
    const w = await writer.done;
    expect(w.code).not.toBe(0); // cut off mid-stream
    const flushed = writer.lines.length;
    expect(writer.lines).toEqual(Array.from({ length: flushed }, (_, i) => String(i)));
    expect(flushed).toBeGreaterThanOrEqual(KILL_AFTER);

    // restart through the CLI: the device set is back, the stale sockets are replaced
    await cli(sb, ['daemon']);
    expect(daemonPid(sb)).not.toBe(pid);
    expect(await cli(sb, ['ls'])).toBe('base\t(253:0)\nw\t(253:1)\n');
    expect(await cli(sb, ['info', 'w'])).toMatch(/^Open count: +0$/m);

    // model: writes [0, flushed) done in order; write `flushed` was in flight (each of its
    // sectors old or new); nothing else
    for (let k = 0; k < flushed; k++) model.fill(fillOf(k), (k % BLOCKS) * BLOCK, (k % BLOCKS + 1) * BLOCK);
    const out = path.join(sb.dir, 'after-kill.img');
    await ok('nbdcopy', [devUri(sb, 'w'), out]);
    const got = fs.readFileSync(out);
    const inFlight = (flushed % BLOCKS) * BLOCK;
    for (let s = inFlight; s < inFlight + BLOCK; s += 512) {
      const sector = got.subarray(s, s + 512);
      const v = sector[0]!;
      expect(v === model[s] || v === fillOf(flushed), `sector ${s / 512} of the write in flight`).toBe(true);
      expect(sector.every((x) => x === v)).toBe(true);
      model.fill(v, s, s + 512);
    }
    expect(firstDiff(got, model), 'device: first differing sector').toBe(-1);
    const want = expectedFiles(model);
    const files = backingFiles();
    expect(firstDiff(files[0]!, want[0]!), 's0: first differing sector').toBe(-1);
    expect(firstDiff(files[1]!, want[1]!), 's1: first differing sector').toBe(-1);

    // clients reconnect and write on
    const s = await Nbdsh.connect(devUri(sb, 'w'));
    try {
      const last = ((flushed - 1) % BLOCKS) * BLOCK;
      expect(await s.ok(`result = h.pread(512, ${last})`)).toBe(Buffer.alloc(512, fillOf(flushed - 1)).toString('hex'));
      await s.ok(`h.pwrite(b"\\xee" * ${BLOCK}, ${(BLOCKS - 1) * BLOCK}); h.flush()`);
    } finally {
      await s.close();
    }
    model.fill(0xee, (BLOCKS - 1) * BLOCK);
    const again = expectedFiles(model);
    expect(backingFiles().every((f, i) => firstDiff(f, again[i]!) === -1)).toBe(true);
    expect((await ok('nbdinfo', ['--size', devUri(sb, 'w')])).trim()).toBe(String(2 * IMG));
  });

  test('SIGTERM with a write queued on a suspended device: ESHUTDOWN, orderly stop, back suspended after restart', async () => {
    const s = await Nbdsh.connect(devUri(sb, 'w'));
    await cli(sb, ['suspend', 'w']);
    await s.ok(`c = h.aio_pwrite(b"\\x42" * 4096, 0)
for _ in range(3): h.poll(20)`);
    expect(await s.ok('result = h.aio_command_completed(c)')).toBe(false);
    const pid = sandboxDaemon(sb);
    expect(pid).toBeGreaterThan(0);
    process.kill(pid, 'SIGTERM');
    const r = await s.run(`done, n = False, 0
while not done and n < 300:
    h.poll(100); n += 1
    done = h.aio_command_completed(c)`);
    expect(r).toMatchObject({ ok: false, errno: 'ESHUTDOWN' });
    await s.close();
    await waitGone(pid);
    const log = fs.readFileSync(path.join(sb.runtimeDir, 'daemon.log'), 'utf8');
    expect(log).toMatch(/SIGTERM: shutting down/);
    expect(log).not.toMatch(/shutdown failed|without finishing/);
    expect(fs.existsSync(path.join(sb.runtimeDir, 'daemon.pid'))).toBe(false);

    await cli(sb, ['daemon']);
    expect(await cli(sb, ['info', '-c', '--noheadings', 'w'])).toMatch(/^w +253 +1 L-sw /);
    await cli(sb, ['resume', 'w']);
    // the write was refused, not half-done: block 0 holds what it held
    const s2 = await Nbdsh.connect(devUri(sb, 'w'));
    try {
      expect(await s2.ok('result = h.pread(512, 0)')).toBe(model.subarray(0, 512).toString('hex'));
    } finally {
      await s2.close();
    }
    expect((await dmkit(sb, ['remove', 'base'])).stderr).toBe('dmkit: base: device is busy (open count 1: used by dm:w)\n');
  });
});

/**
 * The online clone of docs/howto/clone-live-volume.md, through the real daemon, the `dmkit`
 * CLI and the NBD export, under an application writing all along (a separate process with
 * its own NBD connection to `vol`):
 *
 *   linear on old → load + resume a 2-leg mirror (old, new) → wait --progress until in sync
 *   → load + resume linear on new → the old disk is free.
 *
 * The new disk `new` is a dm device (as /dev/mapper/NEWDISK is in the md recipe). It starts
 * as a `delay` that holds writes, so the resync is deterministically under way while the
 * test looks at status and progress; reloading it as `linear` lets the copies through.
 * At the end the new image must equal the old image's initial content with every write
 * the application saw acknowledged replayed over it, byte for byte.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT, cleanup, dmkit, ok, pattern, sandbox, start, type Sandbox } from '../helpers/daemon.ts';
import { expectSameBytes } from '../compliance/helpers.ts';
import { heldTable, readThroughNbd } from '../helpers/mirror.ts';
import { NbdWriter, replay } from '../helpers/nbd-writer.ts';
import { requireTools, unixUri } from '../helpers/nbd-tools.ts';

const LEN = 32768; // sectors: 16 MiB
const REGION = 256; // sectors: 128 regions
const NR = LEN / REGION;

let sb: Sandbox;
let nbdSock: string;

beforeAll(() => {
  requireTools(['nbdcopy', 'script']);
  sb = sandbox();
  nbdSock = path.join(sb.runtimeDir, 'nbd.sock');
});
afterAll(async () => {
  await cleanup(sb);
});

function images(prefix: string, seed: number): { oldImg: string; newImg: string; initial: Buffer } {
  const oldImg = path.join(sb.dir, `${prefix}-old.img`);
  const newImg = path.join(sb.dir, `${prefix}-new.img`);
  const initial = pattern(LEN * 512, seed);
  fs.writeFileSync(oldImg, initial);
  fs.writeFileSync(newImg, Buffer.alloc(0));
  fs.truncateSync(newImg, LEN * 512);
  return { oldImg, newImg, initial };
}


describe('online clone of a live volume through the daemon, the CLI and NBD', () => {
  it('moves a volume under a continuous NBD writer to the new disk, byte for byte', async () => {
    const { oldImg, newImg, initial } = images('clone', 7);
    await ok(sb, ['create', 'old', '--table', `0 ${LEN} linear ${oldImg} 0`]);
    await ok(sb, ['create', 'new', '--table', heldTable(LEN, newImg)]);
    await ok(sb, ['create', 'vol', '--table', `0 ${LEN} linear dm:old 0`]);

    const writer = new NbdWriter({
      uri: unixUri(nbdSock, 'vol'),
      log: path.join(sb.dir, 'clone-acks.log'),
      work: { kind: 'random', seed: 42, lanes: 4, blockBytes: 4096, sizeBytes: LEN * 512, flushEvery: 16 },
    });
    await writer.waitWrites(40);

    // linear → mirror (old, new): I/O is queued during the swap, not failed
    const mirror = `0 ${LEN} mirror core 1 ${REGION} 2 dm:old 0 dm:new 0`;
    await ok(sb, ['load', 'vol', '--table', mirror]);
    await ok(sb, ['resume', 'vol']);
    expect(await ok(sb, ['table', 'vol'])).toBe(`${mirror}\n`);
    // the first copies are held by `new`: nothing is in sync yet
    expect(await ok(sb, ['status', 'vol'])).toBe(`0 ${LEN} mirror 2 dm:old dm:new 0/${NR} 1 AA 1 core\n`);

    // the resync rate is an integer in bytes per second: no unit suffixes
    const bad = await dmkit(sb, ['message', 'vol', '0', 'resync-rate', '50M']);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toContain("invalid resync rate '50M' (expected a non-negative integer)");
    expect(await ok(sb, ['message', 'vol', '0', 'resync-rate', String(50 * 1024 * 1024)])).toBe('');

    const waiting = start(sb, ['wait', '--progress', 'vol']);
    await waiting.stderrHas(`vol: resync 0/${LEN} sectors (0%), `);

    // the new disk takes writes: the held copies land and the resync runs to the end
    await ok(sb, ['load', 'new', '--table', `0 ${LEN} linear ${newImg} 0`]);
    await ok(sb, ['resume', 'new']);
    const progress = await waiting.done;
    expect(progress).toMatchObject({ code: 0, stdout: '' });
    const lines = progress.stderr.trimEnd().split('\n');
    expect(lines.length).toBeGreaterThanOrEqual(2);
    let prev = -1;
    for (const line of lines) {
      const m = /^vol: resync (\d+)\/(\d+) sectors \((\d+)%\), \d+(\.\d)? (B|KiB|MiB|GiB)\/s, ETA (-|\d+:\d\d(:\d\d)?)$/.exec(line);
      expect(m, line).not.toBeNull();
      expect(Number(m![2])).toBe(LEN);
      expect(Number(m![1])).toBeGreaterThanOrEqual(prev);
      prev = Number(m![1]);
    }
    expect(lines.at(-1)).toMatch(new RegExp(`^vol: resync ${LEN}/${LEN} sectors \\(100%\\), .*, ETA 0:00$`));
    expect(await ok(sb, ['status', 'vol'])).toBe(`0 ${LEN} mirror 2 dm:old dm:new ${NR}/${NR} 1 AA 1 core\n`);

    // in sync: every write now lands on both disks; then the volume moves to the new disk
    await writer.waitWrites(writer.acks().writes.length + 40);
    await ok(sb, ['load', 'vol', '--table', `0 ${LEN} linear dm:new 0`]);
    await ok(sb, ['resume', 'vol']);
    expect(await ok(sb, ['table', 'vol'])).toBe(`0 ${LEN} linear dm:new 0\n`);
    await writer.waitWrites(writer.acks().writes.length + 40);
    const acks = await writer.stop();
    expect(acks.errors).toEqual([]);
    expect(acks.flushed).toBe(acks.writes.length);

    // the old disk is no longer used by anything
    expect(await ok(sb, ['deps', 'vol'])).toBe('1 dependencies\t: (dm:new)\n');
    await ok(sb, ['remove', 'old']);

    const model = replay(initial, acks.writes);
    expectSameBytes(fs.readFileSync(newImg), model, 'new image');
    expectSameBytes(await readThroughNbd(sb.runtimeDir, 'vol', sb.dir), model, 'vol read through NBD');
    await ok(sb, ['remove', 'vol', 'new']);
  });

  it('wait --progress draws a progress bar on a terminal', async () => {
    const len = 16384;
    const { oldImg, newImg } = images('tty', 9);
    await ok(sb, ['create', 'new2', '--table', heldTable(len, newImg)]);
    await ok(sb, ['create', 'vol2', '--table', `0 ${len} mirror core 1 ${REGION} 2 ${oldImg} 0 dm:new2 0`]);

    // a pseudo-terminal from script(1); it exits with the command's status (-e)
    const cmd = `'${process.execPath}' bin/dmkit.js wait --progress vol2`;
    const child = spawn('script', ['-qefc', cmd, '/dev/null'], { cwd: ROOT, env: sb.env, stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    for (const end = Date.now() + 30_000; !out.includes('sectors'); ) {
      if (Date.now() > end || child.exitCode !== null) throw new Error(`no progress bar: ${JSON.stringify(out)}`);
      await new Promise((r) => setTimeout(r, 25));
    }
    await ok(sb, ['load', 'new2', '--table', `0 ${len} linear ${newImg} 0`]);
    await ok(sb, ['resume', 'new2']);
    expect(await exited).toBe(0);
    expect(out).toContain(`vol2 resync [`);
    expect(out).toMatch(new RegExp(`0% \\| 0/${len} sectors`));
    expect(out).toContain(`] 100% | ${len}/${len} sectors`);
    expect(out).not.toContain('no background work');
    // the bar ends its line once; no blank line after it
    expect(out).not.toMatch(/\r?\n\r?\n$/);
    expect(await ok(sb, ['status', 'vol2'])).toBe(`0 ${len} mirror 2 ${oldImg} dm:new2 ${len / REGION}/${len / REGION} 1 AA 1 core\n`);
    await ok(sb, ['remove', 'vol2', 'new2']);
  });
});

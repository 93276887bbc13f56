/**
 * mirror through the real daemon, the `dmkit` CLI and the NBD export, with real processes:
 *  - SIGKILL of the daemon with writes in flight on a disk-log mirror: the daemon the CLI
 *    restarts resyncs exactly the regions the log file recorded dirty (read with an
 *    independent decoder of the kernel's layout), and the legs end identical with every
 *    flushed write;
 *  - a leg on an nbdkit export: in sync with the local leg, then nbdkit killed under
 *    writes: the leg is marked failed and the writer never sees an error.
 * Leg failures by reloading a leg as `error`/`flakey`: mirror-daemon-legs.test.ts. The
 * mirror-library tests cover the same ground through the library. No timing assertions:
 * a resync that must be seen part-way is held by a `delay` leg holding writes.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectSameBytes } from '../compliance/helpers.ts';
import { cleanup, client, daemonPid, isAlive, ok, pattern, sandbox, signalDaemon, start, type Sandbox } from '../helpers/daemon.ts';
import {
  blankImage, heldTable, inSync, readKernelMirrorLog, readThroughNbd, waitKernelLog, waitMirror,
} from '../helpers/mirror.ts';
import { requireTools, unixUri } from '../helpers/nbd-tools.ts';
import { startNbdkit } from '../helpers/nbdkit.ts';
import { NbdWriter, replay, writeData } from '../helpers/nbd-writer.ts';
import type { DeviceSummary } from '../../src/daemon/protocol.ts';

let sb: Sandbox;

beforeAll(() => {
  requireTools(['nbdcopy', 'nbdkit']);
  sb = sandbox();
});
afterAll(async () => {
  await cleanup(sb);
});

function filled(name: string, bytes: number, seed: number): { file: string; data: Buffer } {
  const file = path.join(sb.dir, name);
  const data = pattern(bytes, seed);
  fs.writeFileSync(file, data);
  return { file, data };
}

const exportUri = (name: string): string => unixUri(path.join(sb.runtimeDir, 'nbd.sock'), name);

describe('mirror with a disk log: SIGKILL of the daemon during writes', () => {
  const LEN = 8192; // 4 MiB
  const REGION = 128;
  const NR = LEN / REGION; // 64
  const FLUSHED = [2, 9, 17, 33, 50];
  const IN_FLIGHT = [3, 9, 21, 40, 41, 63]; // K = 6 regions with writes in flight at the kill
  const at = (r: number, off: number): number => r * REGION * 512 + off;

  it('resyncs after the restart only the regions the log recorded dirty; legs end identical', async () => {
    const a = filled('a.img', LEN * 512, 3);
    const b = blankImage(sb.dir, 'b.img', LEN * 512);
    const logImg = blankImage(sb.dir, 'mirror.log', 4096); // no magic: a new log, full resync
    await ok(sb, ['create', 'legb', '--table', `0 ${LEN} linear ${b} 0`]);
    await ok(sb, ['create', 'cv', '--table', `0 ${LEN} mirror disk 2 ${logImg} ${REGION} 2 ${a.file} 0 dm:legb 0`]);
    const cl = await client(sb);
    try {
      await waitMirror(cl, 'cv', inSync, 'in sync');
    } finally {
      cl.close();
    }
    await waitKernelLog(logImg, (d) => d.length === 0, 'all clean');

    // acknowledged and flushed writes
    const flushed = new NbdWriter({
      uri: exportUri('cv'), log: path.join(sb.dir, 'flushed.acks'),
      work: { kind: 'list', flush: true, writes: FLUSHED.map((r, i) => ({ offset: at(r, 1024), length: 4096, seed: 100 + i })) },
    });
    await flushed.listed();
    const phase1 = await flushed.stop();
    expect(phase1.writes.length).toBe(FLUSHED.length);
    expect(phase1.flushed).toBe(FLUSHED.length);
    expect(readKernelMirrorLog(logImg).dirty).toEqual([]);

    // writes in flight: leg B holds them, so their regions stay dirty in the log
    await ok(sb, ['load', 'legb', '--table', heldTable(LEN, b)]);
    await ok(sb, ['resume', 'legb']);
    const inFlight = new NbdWriter({
      uri: exportUri('cv'), log: path.join(sb.dir, 'inflight.acks'),
      work: { kind: 'list', flush: false, writes: IN_FLIGHT.map((r, i) => ({ offset: at(r, 8192), length: 4096, seed: 200 + i })) },
    });
    await waitKernelLog(logImg, (d) => IN_FLIGHT.every((r) => d.includes(r)), 'dirty in every region written');
    expect((await inFlight.kill()).writes).toEqual([]); // none was acknowledged
    const oldPid = await signalDaemon(sb, 'SIGKILL');

    // what the log recorded, by the kernel's layout
    const log = readKernelMirrorLog(logImg);
    expect(log).toMatchObject({ magic: 0x4d695272, version: 2, nrRegions: NR });
    expect(log.dirty.length).toBeGreaterThan(0);
    expect(log.dirty.length).toBeLessThanOrEqual(IN_FLIGHT.length);
    expect(IN_FLIGHT).toEqual(expect.arrayContaining(log.dirty));

    // restarted by the CLI's autostart; the copies to leg B are held, so the count is exact
    const status = await ok(sb, ['status', 'cv']);
    expect(daemonPid(sb)).not.toBe(oldPid);
    expect(isAlive(daemonPid(sb))).toBe(true);
    expect(status).toBe(`0 ${LEN} mirror 2 ${a.file} dm:legb ${NR - log.dirty.length}/${NR} 1 AA 3 disk ${logImg} A\n`);

    // leg B takes writes again: the held copies land and the resync ends
    await ok(sb, ['load', 'legb', '--table', `0 ${LEN} linear ${b} 0`]);
    await ok(sb, ['resume', 'legb']);
    const cl2 = await client(sb);
    try {
      await waitMirror(cl2, 'cv', inSync, 'in sync after the restart');
      await cl2.request('io', { op: 'flush', name: 'cv' });
    } finally {
      cl2.close();
    }
    expect(await ok(sb, ['status', 'cv'])).toBe(`0 ${LEN} mirror 2 ${a.file} dm:legb ${NR}/${NR} 1 AA 3 disk ${logImg} A\n`);
    await waitKernelLog(logImg, (d) => d.length === 0, 'all clean after the resync');

    const [imgA, imgB] = [fs.readFileSync(a.file), fs.readFileSync(b)];
    expectSameBytes(imgB, imgA, 'leg B after the resync');
    // every flushed write is there; regions nobody wrote kept their content
    for (const w of phase1.writes) expectSameBytes(imgA.subarray(w.offset, w.offset + w.length), writeData(w.seed, w.length), `flushed write at ${w.offset}`);
    const model = replay(a.data, phase1.writes);
    for (let r = 0; r < NR; r++) {
      if (!IN_FLIGHT.includes(r)) expectSameBytes(imgA.subarray(at(r, 0), at(r + 1, 0)), model.subarray(at(r, 0), at(r + 1, 0)), `region ${r}`);
    }
    await ok(sb, ['remove', 'cv', 'legb']);
  });
});

describe('mirror with a leg on an nbdkit export', () => {
  const LEN = 8192; // 4 MiB
  const REGION = 128;
  const NR = LEN / REGION;

  it('resyncs onto the export, then fails the leg when nbdkit dies under writes', async () => {
    const local = filled('local.img', LEN * 512, 21);
    const remoteImg = blankImage(sb.dir, 'remote.img', LEN * 512);
    const kit = await startNbdkit(path.join(sb.dir, 'kit.sock'), ['file', remoteImg]);
    const cl = await client(sb).catch(async () => {
      await ok(sb, ['daemon']);
      return client(sb);
    });
    try {
      await ok(sb, ['create', 'nv', '--table', `0 ${LEN} mirror core 1 ${REGION} 2 ${local.file} 0 ${kit.uri} 0 1 handle_errors`]);
      await waitMirror(cl, 'nv', inSync, 'in sync');
      expect(await ok(sb, ['status', 'nv'])).toBe(`0 ${LEN} mirror 2 ${local.file} ${kit.uri} ${NR}/${NR} 1 AA 1 core\n`);
      expectSameBytes(fs.readFileSync(remoteImg), local.data, 'nbdkit image after the resync');

      // no flushes from the writer: a flush failing on the dead leg would show F, not D
      const writer = new NbdWriter({
        uri: exportUri('nv'), log: path.join(sb.dir, 'nv.acks'),
        work: { kind: 'random', seed: 77, lanes: 4, blockBytes: 4096, sizeBytes: LEN * 512, flushEvery: 0 },
      });
      const before = (await writer.waitWrites(40)).writes.length;
      const eventNr = (await cl.request<DeviceSummary>('info', { name: 'nv' })).eventNr;
      const waiting = start(sb, ['wait', 'nv', String(eventNr)]);
      await kit.kill();
      expect(await waiting.done).toMatchObject({ code: 0, stderr: '' });
      const s = await waitMirror(cl, 'nv', (x) => x.health === 'AD', 'with the nbdkit leg failed');
      expect(s.inSync).toBeLessThan(NR); // handle_errors: what the dead leg missed is out of sync
      await writer.waitWrites(writer.acks().writes.length + 40); // on the local leg alone
      const acks = await writer.stop();
      expect(acks.errors).toEqual([]);
      expect(acks.writes.length).toBeGreaterThan(before + 40);

      const model = replay(local.data, acks.writes);
      expectSameBytes(await readThroughNbd(sb.runtimeDir, 'nv', sb.dir), model, 'volume read through NBD');
      expectSameBytes(fs.readFileSync(local.file), model, 'local leg');

      // drop the dead leg: a one-leg table on the survivor
      await ok(sb, ['load', 'nv', '--table', `0 ${LEN} linear ${local.file} 0`]);
      await ok(sb, ['resume', 'nv']);
      expectSameBytes(await readThroughNbd(sb.runtimeDir, 'nv', sb.dir), model, 'volume on the surviving leg');
      await ok(sb, ['remove', 'nv']);
    } finally {
      cl.close();
      await kit.kill();
    }
  });
});

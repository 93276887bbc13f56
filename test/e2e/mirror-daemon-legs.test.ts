/**
 * A mirror leg failing under an application, through the real daemon, the `dmkit` CLI and
 * the NBD export: the leg's `dm:` device is reloaded as `error` or as an always-down
 * `flakey` (`0 1`: up 0 s, down 1 s) while a writer process writes through NBD, with and
 * without handle_errors. Checked: `dmkit wait DEV EVENT_NR` returns on the failure event,
 * the health chars (D for the failed leg), the in-sync count, no error reaches the writer,
 * and the volume (read through NBD) and the surviving leg hold every acknowledged write.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ControlClient } from '../../src/daemon/client.ts';
import type { DeviceSummary } from '../../src/daemon/protocol.ts';
import { expectSameBytes } from '../compliance/helpers.ts';
import { cleanup, client, ok, pattern, sandbox, start, type Sandbox } from '../helpers/daemon.ts';
import { LEG_FAIL_CASES, mirrorStatus, readThroughNbd } from '../helpers/mirror.ts';
import { requireTools, unixUri } from '../helpers/nbd-tools.ts';
import { NbdWriter, replay } from '../helpers/nbd-writer.ts';

// every case but the default leg failing without handle_errors
const FAIL_CASES = LEG_FAIL_CASES.filter((tc) => tc.leg === 1 || tc.handleErrors);

const LEN = 4096; // 2 MiB
const REGION = 64;
const NR = LEN / REGION;

let sb: Sandbox;
let cl: ControlClient;

beforeAll(async () => {
  requireTools(['nbdcopy']);
  sb = sandbox();
  await ok(sb, ['daemon']);
  cl = await client(sb);
});
afterAll(async () => {
  cl?.close();
  await cleanup(sb);
});

describe.each(FAIL_CASES)('mirror through the daemon, a failing leg: $name', (tc) => {
  it('marks the leg D, wakes dmkit wait, loses no acknowledged write', async () => {
    const p = `f${FAIL_CASES.indexOf(tc)}`;
    const initial = pattern(LEN * 512, 11 + FAIL_CASES.indexOf(tc));
    const imgs = [path.join(sb.dir, `${p}-0.img`), path.join(sb.dir, `${p}-1.img`)];
    for (const f of imgs) fs.writeFileSync(f, initial); // identical legs: the mirror starts nosync
    await cl.request('create', { name: `${p}l0`, table: `0 ${LEN} linear ${imgs[0]} 0` });
    await cl.request('create', { name: `${p}l1`, table: `0 ${LEN} linear ${imgs[1]} 0` });
    const features = tc.handleErrors ? ' 1 handle_errors' : '';
    await cl.request('create', { name: p, table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 dm:${p}l0 0 dm:${p}l1 0${features}` });
    expect(await mirrorStatus(cl, p)).toMatchObject({ inSync: NR, regions: NR, health: 'AA' });

    // no flushes while the leg fails: a failed flush would show F before D
    const writer = new NbdWriter({
      uri: unixUri(path.join(sb.runtimeDir, 'nbd.sock'), p), log: path.join(sb.dir, `${p}.acks`),
      work: { kind: 'random', seed: 5 + FAIL_CASES.indexOf(tc), lanes: 2, blockBytes: 4096, sizeBytes: LEN * 512, flushEvery: 0 },
    });
    await writer.waitWrites(20);
    const eventNr = (await cl.request<DeviceSummary>('info', { name: p })).eventNr;
    const waiting = start(sb, ['wait', p, String(eventNr)]);

    const failing = `${p}l${tc.leg}`;
    const faultTable = tc.fault === 'error' ? `0 ${LEN} error` : `0 ${LEN} flakey ${imgs[tc.leg]} 0 0 1`;
    await ok(sb, ['load', failing, '--table', faultTable]);
    await ok(sb, ['resume', failing]);
    expect(await waiting.done).toMatchObject({ code: 0, stdout: '', stderr: '' });

    await writer.waitWrites(writer.acks().writes.length + 30); // writes go on
    const status = await ok(sb, ['status', p]);
    const health = tc.leg === 1 ? 'AD' : 'DA';
    const m = new RegExp(`^0 ${LEN} mirror 2 dm:${p}l0 dm:${p}l1 (\\d+)/${NR} 1 ${health} 1 core\\n$`).exec(status);
    expect(m, status).not.toBeNull();
    // handle_errors records the regions the failed leg missed; without it they stay in sync
    if (tc.handleErrors) expect(Number(m![1])).toBeLessThan(NR);
    else expect(Number(m![1])).toBe(NR);

    const acks = await writer.stop();
    expect(acks.errors).toEqual([]);
    const model = replay(initial, acks.writes);
    const survivor = 1 - tc.leg;
    expectSameBytes(await readThroughNbd(sb.runtimeDir, p, sb.dir), model, 'volume read through NBD');
    expectSameBytes(fs.readFileSync(imgs[survivor]!), model, `surviving leg ${survivor}`);

    for (const name of [p, `${p}l0`, `${p}l1`]) await cl.request('remove', { name });
  });
});

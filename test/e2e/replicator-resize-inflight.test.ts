/**
 * `replog resize` shrinking the ring while a write waits inside the replicator (here for the
 * group's resume): the write was sized for the old ring's largest entry and no longer fits
 * one. It is logged in pieces that fit, not failed (EINVAL). Real engine, real files; both
 * images compared with a model at the end.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { image, Model, tmpDir, waitFor } from '../helpers/replication.ts';

const SECTORS = 8192;
const MiB = 1 << 20;
let dm: DeviceMapper | null = null;
let dir = '';

afterEach(async () => {
  await dm?.close();
  dm = null;
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('replog resize with a write waiting', () => {
  it('a 1 MiB write that waited while the ring shrank below a 1 MiB entry is split, not failed', async () => {
    dir = tmpDir();
    const rlog = image(dir, 'rlog', 16384 + 64);
    const local = image(dir, 'local.img', SECTORS);
    const remote = image(dir, 'remote.img', SECTORS);
    image(dir, 'dlog', 64);
    dm = new DeviceMapper();
    await dm.create('site', { table: `0 ${SECTORS} linear ${remote} 0` });
    await dm.create('repl', { table: `0 1 replicator ringbuffer 4 ${rlog} 0 auto 16384 blockdev 1 0 blockdev 2 1 async` });
    // regions of 4096 sectors: a 1 MiB write is one bio and, in a ring of 16384 sectors, one entry
    await dm.create('vol', { table: `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${local} nolog 0 1 1 dm:site disk 3 ${path.join(dir, 'dlog')} 4096 nosync` });
    const model = new Model(SECTORS);
    await dm.suspend('repl'); // writers of the group wait for its resume, already sized
    const data = crypto.randomBytes(MiB);
    let failed: unknown = null;
    const waiting = dm.write('vol', MiB, data).catch((err: unknown) => void (failed = err));
    await new Promise((r) => setTimeout(r, 100));
    await dm.message('repl', 0, ['replog', 'resize', '4096']); // the largest entry is now 512 KiB
    await dm.resume('repl');
    await waiting;
    expect(failed).toBeNull();
    model.write(MiB, data);
    await waitFor(() => /^0:S,0,0 1:A,0,0 /.test(dm!.status('repl')[0]!.params), 'the site caught up');
    expect(fs.readFileSync(local).equals(model.bytes), 'local image').toBe(true);
    expect(fs.readFileSync(remote).equals(model.bytes), 'site image').toBe(true);
  });
});

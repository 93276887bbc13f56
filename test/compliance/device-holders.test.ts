/**
 * Who holds a device open, as `remove` says when it refuses (`device is busy (open count
 * N…)`): a device stacked on it by its name (`used by dm:top`, the name it has now, once
 * however many of its tables hold it), an opener that does not say who it is only counted
 * (a library user's `open()`: `open count 1`; NBD clients name themselves: test/e2e/nbd-holders),
 * and the replication receiver holding a
 * device that receives a stream by the sending group (`receiving replication stream of
 * group 'repl', held while that sender is connected`), over a real tcp slink in one process.
 * Once the holders are gone the device is removed.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { log } from '../../src/core/log.ts';
import { DeviceMapper } from '../../src/index.ts';
import { loadSecret, receivingHolder } from '../../src/replication/handshake.ts';
import { ReplicationReceiver } from '../../src/replication/receiver.ts';
import { image, rejectionOf as rejection, tmpDir, waitFor } from '../helpers/replication.ts';
import './helpers.ts'; // quiets the engine's warnings

const LEN = 2048;

let dir: string;
let dm: DeviceMapper;

beforeEach(() => {
  dir = tmpDir('dmkit-holders-');
  dm = new DeviceMapper();
});
afterEach(async () => {
  await dm.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function busy(engine: DeviceMapper, name: string): Promise<{ code?: string; message: string }> {
  const err = await rejection(engine.remove(name));
  return { code: err.code, message: err.message };
}

describe('remove: who holds a busy device', () => {
  it('a stacked device by its name, as it is now; several once each, others counted', async () => {
    await dm.create('base', { table: `0 ${LEN} linear ${image(dir, 'base.img', LEN)} 0` });
    await dm.create('top', { table: `0 ${LEN} linear dm:base 0` });
    expect(await busy(dm, 'base')).toEqual({ code: 'EBUSY', message: 'base: device is busy (open count 1: used by dm:top)' });

    dm.rename('top', 'upper');
    expect((await busy(dm, 'base')).message).toBe('base: device is busy (open count 1: used by dm:upper)');

    // a reload holds it twice (live and inactive table): one holder, named once
    await dm.load('upper', `0 ${LEN} linear dm:base 0`);
    expect(dm.info('base').openCount).toBe(2);
    expect((await busy(dm, 'base')).message).toBe('base: device is busy (open count 2: used by dm:upper)');
    await dm.resume('upper');

    await dm.create('side', { table: `0 8 linear dm:base 8` });
    const base = dm.get('base');
    base.open(); // an opener that does not say who it is (a library user)
    expect((await busy(dm, 'base')).message).toBe('base: device is busy (open count 3: used by dm:upper, used by dm:side, and 1 other opener)');

    await dm.remove('upper');
    await dm.remove('side');
    expect((await busy(dm, 'base')).message).toBe('base: device is busy (open count 1)');
    base.close();
    await dm.remove('base');
    expect(dm.has('base')).toBe(false);
  });

  it('a device receiving a replication stream by the sending group', async () => {
    const site = new DeviceMapper();
    const secret = path.join(dir, 'site.key');
    fs.writeFileSync(secret, '0123456789abcdef0123456789abcdef\n', { mode: 0o600 });
    const rx = new ReplicationReceiver(site, { host: '127.0.0.1', port: 0, secret: loadSecret(secret), stateDir: path.join(dir, 'positions') }, log('rx'));
    try {
      const { port } = await rx.listen();
      await site.create('vol', { table: `0 ${LEN} linear ${image(dir, 'site.img', LEN)} 0` });
      await dm.create('repl', { table: `0 1 replicator ringbuffer 3 ${image(dir, 'rlog', 8192)} 0 auto blockdev 1 0 tcp 4 1 async peer=127.0.0.1:${port} secret=${secret}` });
      await dm.create('vol', { table: `0 ${LEN} replicator-dev dm:repl 0 0 1 ${image(dir, 'local.img', LEN)} nolog 0 1 1 vol core 1 64` });
      await waitFor(() => site.info('vol').openCount === 1, 'the receiver to open vol');

      expect(await busy(site, 'vol')).toEqual({
        code: 'EBUSY',
        message: "vol: device is busy (open count 1: receiving replication stream of group 'repl', held while that sender is connected)",
      });

      // the sender lets go (its replicator-dev removed: CLOSE): the site's device goes
      await dm.remove('vol');
      await waitFor(() => site.info('vol').openCount === 0, 'the receiver to close vol');
      await site.remove('vol');
      expect(site.has('vol')).toBe(false);
    } finally {
      await dm.close();
      await rx.close();
      await site.close();
    }
  });

  it('receivingHolder names the group from the sender\'s HELLO name, or the name, or no one', () => {
    expect(receivingHolder({ peerName: 'repl slink 1' })).toBe("receiving replication stream of group 'repl', held while that sender is connected");
    expect(receivingHolder({ peerName: 'my group slink 12' })).toBe("receiving replication stream of group 'my group', held while that sender is connected");
    expect(receivingHolder({ peerName: 'tool' })).toBe("receiving replication stream from 'tool', held while that sender is connected");
    expect(receivingHolder({ peerName: null })).toBe('receiving replication stream from a sender, held while that sender is connected');
  });
});

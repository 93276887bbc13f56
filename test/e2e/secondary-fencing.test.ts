/**
 * A secondary device's way in for its replication stream (MappedDevice.setSecondary) writes
 * only while the device still receives that stream: once it is promoted (clearSecondary) or
 * handed to another stream, a write of the old stream, in flight or queued behind a
 * suspend, fails with EROFS and changes nothing (the receiver's promotion fence,
 * src/replication/role-ops.ts). Real engine, real image file; bytes compared.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import type { Bio } from '../../src/core/bio.ts';

const SECTORS = 64;
let dm: DeviceMapper | null = null;
let dir = '';

afterEach(async () => {
  await dm?.close();
  dm = null;
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function setUp(): Promise<{ img: string }> {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-fence-'));
  const img = path.join(dir, 'vol.img');
  fs.writeFileSync(img, Buffer.alloc(SECTORS * 512));
  dm = new DeviceMapper();
  await dm.create('vol', { table: `0 ${SECTORS} linear ${img} 0` });
  return { img };
}

const block = (byte: number): Buffer => Buffer.alloc(4096, byte);
const write = (sector: number, data: Buffer): Bio => ({ op: 'write', sector, sectors: data.length / 512, data, flags: {} });
const at = (img: string, sector: number): number => fs.readFileSync(img)[sector * 512]!;

describe('a secondary device fences its old stream', () => {
  it('after promotion the old stream\'s way in is refused; the device\'s own writers are not', async () => {
    const { img } = await setUp();
    const dev = dm!.get('vol');
    const writer = await dev.setSecondary('replication stream aa');
    await expect(dev.submit(write(0, block(1)))).rejects.toMatchObject({ code: 'EROFS' });
    await writer.submit(write(0, block(2)));
    expect(at(img, 0)).toBe(2);
    await dev.clearSecondary(); // promoted
    await expect(writer.submit(write(0, block(3)))).rejects.toMatchObject({ code: 'EROFS', message: expect.stringContaining('no longer receives') });
    expect(at(img, 0)).toBe(2);
    await dev.submit(write(8, block(4)));
    expect(at(img, 8)).toBe(4);
    await dev.submit({ op: 'flush', sector: 0, sectors: 0, data: Buffer.alloc(0), flags: {} });
  });

  it('a write of the old stream queued behind a suspend fails when the device resumes promoted', async () => {
    const { img } = await setUp();
    const dev = dm!.get('vol');
    const writer = await dev.setSecondary('replication stream bb');
    await dm!.suspend('vol');
    const late = writer.submit(write(16, block(5)));
    let settled = false;
    void late.then(() => (settled = true), () => (settled = true));
    await new Promise((r) => setTimeout(r, 50));
    expect(settled, 'queued while suspended').toBe(false);
    await dev.clearSecondary();
    await dm!.resume('vol');
    await expect(late).rejects.toMatchObject({ code: 'EROFS' });
    expect(at(img, 16)).toBe(0);
  });

  it('a device handed to another stream refuses the first stream\'s way in', async () => {
    const { img } = await setUp();
    const dev = dm!.get('vol');
    const first = await dev.setSecondary('replication stream cc');
    await dev.clearSecondary();
    const second = await dev.setSecondary('replication stream dd');
    await expect(first.submit(write(24, block(6)))).rejects.toMatchObject({ code: 'EROFS' });
    await second.submit(write(24, block(7)));
    expect(at(img, 24)).toBe(7);
    // the same stream asking again keeps its way in
    const again = await dev.setSecondary('replication stream dd');
    await again.submit(write(32, block(8)));
    await second.submit(write(40, block(9)));
    expect([at(img, 32), at(img, 40)]).toEqual([8, 9]);
  });
});

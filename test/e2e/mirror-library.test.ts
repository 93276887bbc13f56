/**
 * mirror end to end through the library (`new DeviceMapper()`), over real image files:
 *  (a) online clone (the md RAID1 "--build … missing, --add" recipe): a live linear volume
 *      reloaded as a 2-leg mirror onto a new image under a continuous writer, then
 *      reloaded as linear on the new image, which must equal the reference model;
 *  (b) leg failure: a leg stacked on `dm:` reloaded as `error` or an always-down
 *      `flakey`, with and without handle_errors;
 *  (c) crash recovery with a disk log: a child process killed with SIGKILL while writes
 *      are in flight; a new engine resyncs only the regions the log recorded dirty.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DeviceMapper, builtinTargets } from '../../src/index.ts';
import { SECTOR, countingTarget, expectSameBytes, makeImage, makeTempDir, prng, sleep } from '../compliance/helpers.ts';
import { LEG_FAIL_CASES, engineMirrorStatus, waitEngineInSync } from '../helpers/mirror.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

let dir: string;
let dm: DeviceMapper;

beforeEach(() => {
  dir = makeTempDir('dmkit-mirror-e2e-');
  dm = new DeviceMapper();
});

afterEach(async () => {
  await dm.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

function blank(name: string, bytes: number): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, Buffer.alloc(0));
  fs.truncateSync(f, bytes);
  return f;
}

describe('mirror e2e: online clone of a live volume', () => {
  const LEN = 8192; // 4 MiB
  const BLOCK = 8; // sectors per write
  const WRITERS = 4;

  it('moves a volume under a continuous writer to a new image, byte for byte', async () => {
    const oldImg = makeImage(dir, 'old.img', LEN, 42);
    const newImg = blank('new.img', LEN * SECTOR);
    const model = fs.readFileSync(oldImg);
    await dm.create('vol', { table: `0 ${LEN} linear ${oldImg} 0` });

    // writer k owns the blocks ≡ k (mod WRITERS): its writes never overlap another's
    let stop = false;
    let acked = 0;
    const writer = async (k: number): Promise<void> => {
      const rng = prng(900 + k);
      while (!stop) {
        const block = rng.int(LEN / BLOCK / WRITERS) * WRITERS + k;
        const data = rng.fill(Buffer.alloc(BLOCK * SECTOR));
        await dm.write('vol', block * BLOCK * SECTOR, data);
        data.copy(model, block * BLOCK * SECTOR);
        acked++;
      }
    };
    const writers = Array.from({ length: WRITERS }, (_, k) => writer(k));
    const waitAcked = async (n: number): Promise<void> => {
      while (acked < n) await sleep(2);
    };

    await waitAcked(20);
    await dm.load('vol', `0 ${LEN} mirror core 1 128 2 ${oldImg} 0 ${newImg} 0`);
    await dm.resume('vol');
    await dm.message('vol', 0, ['resync-rate', String(1 << 20)]);
    await waitAcked(acked + 200); // the writers keep going while the new leg fills
    await dm.message('vol', 0, ['resync-rate', '0']);
    await waitEngineInSync(dm, 'vol');
    const afterSync = acked;
    await waitAcked(afterSync + 50); // in sync, both legs take every write
    stop = true;
    await Promise.all(writers);
    expect(engineMirrorStatus(dm, 'vol').health).toBe('AA');

    await dm.load('vol', `0 ${LEN} linear ${newImg} 0`);
    await dm.resume('vol');
    await dm.flush('vol');
    expectSameBytes(fs.readFileSync(newImg), model, 'new image');
    expectSameBytes(await dm.read('vol', 0, LEN * SECTOR), model, 'volume on the new image');
    expectSameBytes(fs.readFileSync(oldImg), model, 'old image');
  });
});

describe.each(LEG_FAIL_CASES)('mirror e2e: leg failure ($name)', (tc) => {
  const LEN = 2048;
  const REGION = 64;
  const NR = LEN / REGION;

  it('keeps every acknowledged write readable from the survivor and says which leg failed', async () => {
    const rng = prng(tc.leg * 10 + (tc.handleErrors ? 1 : 0));
    const images = [makeImage(dir, 'a.img', LEN, 5), blank('b.img', LEN * SECTOR)];
    fs.copyFileSync(images[0]!, images[1]!); // identical legs: the mirror starts nosync
    const model = fs.readFileSync(images[0]!);
    await dm.create('leg0', { table: `0 ${LEN} linear ${images[0]} 0` });
    await dm.create('leg1', { table: `0 ${LEN} linear ${images[1]} 0` });
    const features = tc.handleErrors ? ' 1 handle_errors' : '';
    await dm.create('vol', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 dm:leg0 0 dm:leg1 0${features}` });

    const writeSome = async (count: number): Promise<Set<number>> => {
      const regions = new Set<number>();
      for (let i = 0; i < count; i++) {
        const sector = rng.int(LEN / 8) * 8;
        const data = rng.fill(Buffer.alloc(8 * SECTOR));
        await dm.write('vol', sector * SECTOR, data);
        data.copy(model, sector * SECTOR);
        regions.add(Math.floor(sector / REGION));
      }
      return regions;
    };

    await writeSome(20);
    await dm.flush('vol');
    const { inSync, regions, health } = engineMirrorStatus(dm, 'vol');
    expect({ inSync, regions, health }).toEqual({ inSync: NR, regions: NR, health: 'AA' });

    const failing = `leg${tc.leg}`;
    const table = tc.fault === 'error' ? `0 ${LEN} error` : `0 ${LEN} flakey ${images[tc.leg]} 0 0 1`;
    await dm.load(failing, table);
    await dm.resume(failing);
    const events = dm.get('vol').eventNr;

    const written = await writeSome(30); // every one acknowledged: the survivor takes it
    expectSameBytes(await dm.read('vol', 0, LEN * SECTOR), model, 'volume after the failure');

    const s = engineMirrorStatus(dm, 'vol');
    const survivor = 1 - tc.leg;
    expect(s.health[tc.leg]).toBe('D');
    expect(s.health[survivor]).toBe('A');
    expect(dm.get('vol').eventNr).toBeGreaterThan(events);
    // handle_errors records the regions the failed leg missed; without it they stay "in sync"
    expect(s.inSync).toBe(tc.handleErrors ? NR - written.size : NR);

    await dm.flush('vol');
    expectSameBytes(fs.readFileSync(images[survivor]!), model, `surviving leg ${survivor} image`);
  });
});

/** The child: builds the mirror, leaves K regions with writes in flight, says READY. */
const CHILD = `
import fs from 'node:fs';
import { DeviceMapper, builtinTargets } from ${JSON.stringify(path.join(ROOT, 'src/index.ts'))};
const [a, b, log, len, region, phase1, phase2] = process.argv.slice(2);
const R = Number(region);
// hold: a mapping onto <dev> whose writes never complete once 'message … hold' was sent
const hold = {
  name: 'hold', version: [1, 0, 0],
  async create(ctx, args) {
    const dev = await ctx.open(args[0]);
    let held = false;
    return {
      map: (bio) => (held && bio.op === 'write' ? new Promise(() => {}) : dev.submit(bio)),
      message: (m) => { held = m[0] === 'hold'; },
      status: (t) => (t === 'table' ? dev.ref : ''),
    };
  },
};
const dm = new DeviceMapper({ targets: [...builtinTargets, hold] });
await dm.create('legB', { table: \`0 \${len} hold \${b}\` });
await dm.create('vol', { table: \`0 \${len} mirror disk 3 \${log} \${R} nosync 2 \${a} 0 dm:legB 0\` });
for (const r of phase1.split(',').map(Number)) await dm.write('vol', r * R * 512, Buffer.alloc(4096, 0x10 + (r & 0x3f)));
await dm.flush('vol');
await dm.message('legB', 0, ['hold']);
const dirty = phase2.split(',').map(Number);
for (const r of dirty) void dm.write('vol', r * R * 512 + 512, Buffer.alloc(4096, 0x80 + (r & 0x3f)));
const clean = (r) => (fs.readFileSync(log)[1024 + (r >> 3)] & (1 << (r & 7))) !== 0;
while (dirty.some(clean)) await new Promise((res) => setTimeout(res, 5));
process.stdout.write('READY\\n');
setInterval(() => {}, 1000);
`;

describe('mirror e2e: crash recovery with a disk log', () => {
  const LEN = 4096;
  const REGION = 64;
  const NR = LEN / REGION;
  const PHASE1 = [0, 7, 20, 41];
  const PHASE2 = [3, 7, 30, 55, 63]; // K = 5 regions with writes in flight at the crash

  it('resyncs only the regions the log recorded dirty, and the legs end identical', async () => {
    const a = blank('a.img', LEN * SECTOR);
    const b = blank('b.img', LEN * SECTOR);
    const log = blank('mirror.log', 4096);
    const child = path.join(dir, 'child.mts');
    fs.writeFileSync(child, CHILD);

    const proc = spawn(process.execPath, ['--import', 'tsx', child, a, b, log, String(LEN), String(REGION), PHASE1.join(','), PHASE2.join(',')], {
      cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    proc.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<void>((resolve) => proc.on('exit', () => resolve()));
    await new Promise<void>((resolve, reject) => {
      let out = '';
      proc.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes('READY')) resolve();
      });
      proc.on('exit', (code) => reject(new Error(`child exited (${code}) before READY: ${stderr}`)));
    });
    proc.kill('SIGKILL');
    await exited;

    // what the log recorded, read with the documented layout
    const onDisk = fs.readFileSync(log);
    expect(onDisk.readUInt32LE(0)).toBe(0x4d695272);
    expect(Number(onDisk.readBigUInt64LE(8))).toBe(NR);
    const dirty = Array.from({ length: NR }, (_, r) => r).filter((r) => !(onDisk[1024 + (r >> 3)]! & (1 << (r & 7))));
    expect(dirty.length).toBeGreaterThanOrEqual(1);
    expect(dirty.length).toBeLessThanOrEqual(PHASE2.length);
    expect(PHASE2).toEqual(expect.arrayContaining(dirty));

    // a new engine: leg B counted, so every region resynced shows as one write on it
    const counting = countingTarget();
    const dm2 = new DeviceMapper({ targets: [...builtinTargets, counting.type] });
    try {
      await dm2.create('cb', { table: `0 ${LEN} counting ${b} 0` });
      await dm2.create('vol', { table: `0 ${LEN} mirror disk 2 ${log} ${REGION} 2 ${a} 0 dm:cb 0` });
      await waitEngineInSync(dm2, 'vol');
      expect(counting.counts.get('cb')!.writes).toBe(dirty.length);
      await dm2.flush('vol');
      const [imgA, imgB] = [fs.readFileSync(a), fs.readFileSync(b)];
      expectSameBytes(imgB, imgA, 'leg B after recovery');
      for (const r of PHASE1) {
        const at = r * REGION * SECTOR;
        expect(imgA.subarray(at, at + 512).every((x) => x === 0x10 + (r & 0x3f)), `acknowledged write in region ${r}`).toBe(true);
      }
      const clean = fs.readFileSync(log).subarray(1024, 1024 + NR / 8);
      expect(clean.every((x) => x === 0xff)).toBe(true);
    } finally {
      await dm2.close();
    }
  });
});

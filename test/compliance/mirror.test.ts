/**
 * mirror target compliance, through the library engine over real image files: status
 * table round trip, random I/O against a reference model (then every leg's image compared
 * byte for byte), flush/FUA reaching every leg and the log, suspend/resume with I/O in
 * flight, messages, and every constructor error with its exact message.
 *
 * Legs that must hold writes or count bios are stacked `dm:` devices of small plugin
 * targets registered in the engine (`hold`, `counting`), never mocks of the engine.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ArgReader } from '../../src/core/args.ts';
import type { Bio } from '../../src/core/bio.ts';
import type { BlockDev, TargetType } from '../../src/core/types.ts';
import { DeviceMapper, builtinTargets } from '../../src/index.ts';
import { SECTOR, countingTarget, expectSameBytes, makeImage, makeTempDir, prng, tableText, track, waitFor } from './helpers.ts';
import { engineMirrorStatus, waitEngineInSync } from '../helpers/mirror.ts';

const LEN = 4096; // sectors (2 MiB)
const REGION = 64;
const NR = LEN / REGION;

/**
 * `hold <dev>`: a linear mapping (offset 0) whose writes are held while `message … hold`
 * is in force and issued at `message … release`.
 */
function holdTarget(): TargetType {
  return {
    name: 'hold',
    version: [1, 0, 0],
    async create(ctx, args) {
      const r = new ArgReader(args, 'hold');
      const dev: BlockDev = await ctx.open(r.next('device'));
      r.expectEnd();
      let held: Array<() => void> | null = null;
      return {
        map(bio: Bio) {
          if (held && bio.op === 'write') {
            const queue = held;
            return new Promise<void>((resolve, reject) => queue.push(() => void dev.submit(bio).then(resolve, reject)));
          }
          return dev.submit(bio);
        },
        message(m: string[]) {
          if (m[0] === 'hold') held ??= [];
          else if (held) {
            const queue = held;
            held = null;
            for (const go of queue) go();
          }
        },
        status: (t) => (t === 'table' ? dev.ref : ''),
      };
    },
  };
}

let dir: string;
let dm: DeviceMapper;
let counting: ReturnType<typeof countingTarget>;

beforeEach(() => {
  dir = makeTempDir('dmkit-mirror-');
  counting = countingTarget();
  dm = new DeviceMapper({ targets: [...builtinTargets, counting.type, holdTarget()] });
});

afterEach(async () => {
  await dm.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

const img = (name: string, sectors = LEN, seed = 1): string => makeImage(dir, name, sectors, seed);
function blank(name: string, bytes: number): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, Buffer.alloc(bytes));
  return f;
}

describe('mirror: status table round trip', () => {
  const tables = (): string[] => {
    const [a, b, c, log] = [img('a'), img('b', LEN + 100), img('c'), blank('log', 4096)];
    return [
      `core 1 ${REGION} 2 ${a} 0 ${b} 0`,
      `core 2 ${REGION} nosync 2 ${a} 0 ${b} 100`,
      `core 2 1024 sync 3 ${a} 0 ${b} 7 ${c} 0 1 handle_errors`,
      `disk 2 ${log} ${REGION} 2 ${a} 0 ${b} 0 2 handle_errors keep_log`,
      `disk 3 ${log} 8 nosync 2 ${a} 0 ${b} 0`,
    ];
  };

  it('re-emits its constructor arguments, which load back to the same table', async () => {
    for (const [i, params] of tables().entries()) {
      const name = `rt${i}`;
      await dm.create(name, { table: `0 ${LEN} mirror ${params}` });
      expect(dm.table(name)[0]!.params).toBe(params);
      await dm.load(name, tableText(dm.table(name)));
      await dm.resume(name);
      expect(dm.table(name)[0]!.params).toBe(params);
      await dm.remove(name);
    }
  });

  it('prints legacy block_on_error as handle_errors, and leaves out 0 features', async () => {
    const [a, b] = [img('a'), img('b')];
    await dm.create('old', { table: `0 ${LEN} mirror core 1 ${REGION} 2 ${a} 0 ${b} 0 1 block_on_error` });
    expect(dm.table('old')[0]!.params).toBe(`core 1 ${REGION} 2 ${a} 0 ${b} 0 1 handle_errors`);
    await dm.create('none', { table: `0 ${LEN} mirror core 1 ${REGION} 2 ${a} 0 ${b} 0 0` });
    expect(dm.table('none')[0]!.params).toBe(`core 1 ${REGION} 2 ${a} 0 ${b} 0`);
  });

  it('reports legs, sync count, health and log in status info', async () => {
    const [a, b, log] = [img('a'), img('b'), blank('log', 4096)];
    await dm.create('core', { table: `0 ${LEN - 10} mirror core 2 ${REGION} nosync 2 ${a} 0 ${b} 0` });
    expect(dm.status('core')[0]!.params).toBe(`2 ${a} ${b} ${NR}/${NR} 1 AA 1 core`);
    await dm.create('disk', { table: `0 ${LEN} mirror disk 3 ${log} ${REGION} nosync 2 ${a} 0 ${b} 0` });
    expect(dm.status('disk')[0]!.params).toBe(`2 ${a} ${b} ${NR}/${NR} 1 AA 3 disk ${log} A`);
  });
});

interface IoCase {
  name: string;
  legs: number;
  offsets: number[];
  log: 'core' | 'disk';
  features: string;
  /** stack leg 1 on a `delay` device that holds writes this long (resync copies hold their regions longer) */
  slowWriteMs?: number;
}

const IO_CASES: IoCase[] = [
  { name: 'core log, 2 legs', legs: 2, offsets: [0, 0], log: 'core', features: '' },
  { name: 'disk log, 3 legs at offsets', legs: 3, offsets: [0, 64, 200], log: 'disk', features: '' },
  { name: 'core log, handle_errors', legs: 2, offsets: [8, 0], log: 'core', features: ' 1 handle_errors' },
  { name: 'disk log, slow leg 1', legs: 2, offsets: [0, 0], log: 'disk', features: '', slowWriteMs: 15 },
];

describe.each(IO_CASES)('mirror: random I/O against a model ($name)', (tc) => {
  it('returns the model on reads during and after resync; every leg equals the model', async () => {
    const rng = prng(tc.legs * 31 + tc.offsets[1]!);
    const legs = tc.offsets.map((off, i) => img(`leg${i}`, LEN + off, 100 + i)); // legs differ at first
    const model = fs.readFileSync(legs[0]!).subarray(tc.offsets[0]! * SECTOR, (tc.offsets[0]! + LEN) * SECTOR);
    const logArgs = tc.log === 'core' ? `core 1 ${REGION}` : `disk 2 ${blank('log', 4096)} ${REGION}`;
    if (tc.slowWriteMs) {
      const [f, off] = [legs[1]!, tc.offsets[1]!];
      await dm.create('slow', { table: `0 ${LEN} delay ${f} ${off} 0 ${f} ${off} ${tc.slowWriteMs}` });
    }
    const legArgs = legs.map((f, i) => (i === 1 && tc.slowWriteMs ? 'dm:slow 0' : `${f} ${tc.offsets[i]}`)).join(' ');
    await dm.create('vol', { table: `0 ${LEN} mirror ${logArgs} ${tc.legs} ${legArgs}${tc.features}` });
    await dm.message('vol', 0, ['resync-rate', String(256 * 1024)]); // keep resync going during the I/O

    for (let batch = 0; batch < 40; batch++) {
      // up to 8 operations on disjoint ranges at once; ranges may cross regions
      const ops: Array<{ write: boolean; sector: number; sectors: number; data: Buffer }> = [];
      const used: Array<[number, number]> = [];
      for (let k = 0; k < 8; k++) {
        const sectors = 1 + rng.int(3 * REGION);
        const sector = rng.int(LEN - sectors + 1);
        if (used.some(([s, n]) => sector < s + n && s < sector + sectors)) continue;
        used.push([sector, sectors]);
        const write = rng.next() < 0.6;
        ops.push({ write, sector, sectors, data: write ? rng.fill(Buffer.alloc(sectors * SECTOR)) : Buffer.alloc(sectors * SECTOR) });
      }
      await Promise.all(ops.map((op) => (op.write
        ? dm.write('vol', op.sector * SECTOR, op.data, { fua: rng.next() < 0.1 })
        : dm.read('vol', op.sector * SECTOR, op.sectors * SECTOR).then((b) => b.copy(op.data)))));
      for (const op of ops) {
        const at = op.sector * SECTOR;
        if (op.write) op.data.copy(model, at);
        else expectSameBytes(op.data, model.subarray(at, at + op.data.length), `read at sector ${op.sector} (batch ${batch})`);
      }
    }

    await dm.message('vol', 0, ['resync-rate', '0']);
    await waitEngineInSync(dm, 'vol');
    expect(engineMirrorStatus(dm, 'vol').health).toBe('A'.repeat(tc.legs));
    await dm.flush('vol');
    expectSameBytes(await dm.read('vol', 0, LEN * SECTOR), model, 'device');
    for (const [i, f] of legs.entries()) {
      const image = fs.readFileSync(f).subarray(tc.offsets[i]! * SECTOR, (tc.offsets[i]! + LEN) * SECTOR);
      expectSameBytes(image, model, `leg ${i} image`);
    }
  });
});

describe('mirror: flush and FUA', () => {
  it('sends FUA writes with FUA to every leg, and flushes to every leg', async () => {
    const [a, b] = [img('a'), img('b')];
    await dm.create('c0', { table: `0 ${LEN} counting ${a} 0` });
    await dm.create('c1', { table: `0 ${LEN} counting ${b} 0` });
    await dm.create('vol', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 dm:c0 0 dm:c1 0` });
    await dm.write('vol', 0, Buffer.alloc(4096, 1), { fua: true });
    await dm.write('vol', 8192, Buffer.alloc(4096, 2));
    for (const leg of ['c0', 'c1']) expect(counting.counts.get(leg)).toMatchObject({ writes: 2, fuaWrites: 1 });
    const before = ['c0', 'c1'].map((l) => counting.counts.get(l)!.flushes);
    await dm.flush('vol');
    ['c0', 'c1'].forEach((l, i) => expect(counting.counts.get(l)!.flushes).toBeGreaterThan(before[i]!));
    expect(fs.readFileSync(b).subarray(0, 4096).every((x) => x === 1)).toBe(true);
  });

  it('persists a mark before the data write, and the clear at the next flush', async () => {
    const [a, b, log] = [img('a'), img('b'), blank('log', 4096)];
    await dm.create('slow', { table: `0 ${LEN} hold ${b}` });
    await dm.create('vol', { table: `0 ${LEN} mirror disk 3 ${log} ${REGION} nosync 2 ${a} 0 dm:slow 0` });
    const region = 5;
    const cleanOnDisk = (): boolean => (fs.readFileSync(log)[1024 + (region >> 3)]! & (1 << (region & 7))) !== 0;
    expect(cleanOnDisk()).toBe(true);
    await dm.message('slow', 0, ['hold']);
    const data = Buffer.alloc(4096, 0x5a);
    const w = track(dm.write('vol', region * REGION * SECTOR, data));
    // the data reaches leg 0 only after the log recorded the region dirty
    await waitFor(() => fs.readFileSync(a).subarray(region * REGION * SECTOR, region * REGION * SECTOR + 4096).equals(data), 'the write on leg 0');
    expect(cleanOnDisk()).toBe(false);
    expect(w.settled).toBe(false);
    await dm.message('slow', 0, ['release']);
    await w.promise;
    await dm.flush('vol');
    expect(cleanOnDisk()).toBe(true);
  });
});

describe('mirror: suspend and resume', () => {
  it('drains writes in flight, stops resync while suspended, and completes after resume', async () => {
    const rng = prng(7);
    const [a, b, log] = [img('a', LEN, 1), img('b', LEN, 2), blank('log', 4096)];
    const model = fs.readFileSync(a);
    await dm.create('vol', { table: `0 ${LEN} mirror disk 2 ${log} ${REGION} 2 ${a} 0 ${b} 0` });
    await dm.message('vol', 0, ['resync-rate', String(512 * 1024)]);
    const writes = Array.from({ length: 16 }, (_, k) => {
      const sector = k * (LEN / 16) + rng.int(LEN / 16 - 16);
      const data = rng.fill(Buffer.alloc(16 * SECTOR));
      data.copy(model, sector * SECTOR);
      return dm.write('vol', sector * SECTOR, data);
    });
    await dm.suspend('vol');
    await Promise.all(writes); // suspend waited for them
    const frozen = engineMirrorStatus(dm, 'vol').inSync;
    expect(frozen).toBeLessThan(NR);
    // on disk, every region the mirror knows in sync is clean (marks of idle regions cleared)
    const bits = fs.readFileSync(log).subarray(1024, 1024 + NR / 8);
    expect([...bits].reduce((n, x) => n + x.toString(2).replaceAll('0', '').length, 0)).toBe(frozen);

    const late = rng.fill(Buffer.alloc(8 * SECTOR));
    late.copy(model, 100 * SECTOR);
    const queued = track(dm.write('vol', 100 * SECTOR, late));
    await new Promise((r) => setTimeout(r, 50));
    expect(queued.settled).toBe(false);
    expect(engineMirrorStatus(dm, 'vol').inSync).toBe(frozen);

    await dm.resume('vol');
    await queued.promise;
    await dm.message('vol', 0, ['resync-rate', '0']);
    await waitEngineInSync(dm, 'vol');
    await dm.flush('vol');
    expectSameBytes(fs.readFileSync(a), model, 'leg 0');
    expectSameBytes(fs.readFileSync(b), model, 'leg 1');
  });

  it('raises one event when sync completes', async () => {
    const [a, b] = [img('a', LEN, 1), img('b', LEN, 2)];
    await dm.create('vol', { table: `0 ${LEN} mirror core 1 ${REGION} 2 ${a} 0 ${b} 0` });
    await waitEngineInSync(dm, 'vol');
    const ev = dm.get('vol').eventNr;
    expect(ev).toBe(1);
    expectSameBytes(fs.readFileSync(b), fs.readFileSync(a), 'leg 1 after resync');
  });
});

describe('mirror: faults', () => {
  it('retries a failed read on an in-sync leg and marks the failing leg R', async () => {
    const [a, b] = [img('a', LEN, 3), img('b', LEN, 4)];
    fs.copyFileSync(a, b);
    await dm.create('leg0', { table: `0 ${LEN} linear ${a} 0` });
    await dm.create('vol', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 dm:leg0 0 ${b} 0` });
    const ev = dm.get('vol').eventNr;
    await dm.load('leg0', `0 ${LEN} error`);
    await dm.resume('leg0');
    expectSameBytes(await dm.read('vol', 0, LEN * SECTOR), fs.readFileSync(b), 'volume read from leg 1');
    expect(engineMirrorStatus(dm, 'vol').health).toBe('RA');
    expect(dm.get('vol').eventNr).toBe(ev + 1); // one event per leg and kind of fault
  });

  it('fails a read of an out-of-sync region when the default leg fails', async () => {
    const [a, b] = [img('a', LEN, 3), img('b', LEN, 4)];
    await dm.create('leg0', { table: `0 ${LEN} linear ${a} 0` });
    await dm.create('vol', { table: `0 ${LEN} mirror core 1 ${REGION} 2 dm:leg0 0 ${b} 0` });
    await dm.message('vol', 0, ['resync-rate', '1']); // resync (almost) stopped: regions stay out of sync
    await dm.load('leg0', `0 ${LEN} error`);
    await dm.resume('leg0');
    await expect(dm.read('vol', (LEN - 8) * SECTOR, 4096)).rejects.toMatchObject({ code: 'EIO' });
    expect(engineMirrorStatus(dm, 'vol').health[0]).toBe('R');
  });

  it.each([
    ['without handle_errors', 'go on', '', true],
    ['with handle_errors', 'go on', ' 1 handle_errors', true],
    ['with handle_errors and keep_log', 'fail', ' 2 handle_errors keep_log', false],
  ])('when the log device fails %s, writes %s', async (_what, _outcome, features, succeeds) => {
    const [a, b, log] = [img('a'), img('b'), blank('log', 4096)];
    fs.copyFileSync(a, b);
    await dm.create('logdev', { table: `0 8 linear ${log} 0` });
    await dm.create('vol', { table: `0 ${LEN} mirror disk 3 dm:logdev ${REGION} nosync 2 ${a} 0 ${b} 0${features}` });
    const ev = dm.get('vol').eventNr;
    await dm.load('logdev', '0 8 error');
    await dm.resume('logdev');
    const data = Buffer.alloc(4096, 0x33);
    const w = dm.write('vol', 0, data);
    if (succeeds) {
      await w;
      expectSameBytes(await dm.read('vol', 0, 4096), data, 'written block');
    } else {
      await expect(w).rejects.toMatchObject({ code: 'EIO' });
    }
    expect(engineMirrorStatus(dm, 'vol').log).toBe('3 disk dm:logdev D');
    expect(dm.get('vol').eventNr).toBeGreaterThan(ev);
  });

  it('ignores a resume of a mirror that is not suspended', async () => {
    const [a, b, log] = [img('a', LEN, 1), img('b', LEN, 2), blank('log', 4096)];
    await dm.create('vol', { table: `0 ${LEN} mirror disk 2 ${log} ${REGION} 2 ${a} 0 ${b} 0` });
    await waitEngineInSync(dm, 'vol');
    const data = Buffer.alloc(8 * SECTOR, 0x44);
    const w = dm.write('vol', 0, data);
    await dm.resume('vol');
    await w;
    expect(engineMirrorStatus(dm, 'vol').inSync).toBe(NR);
    await dm.flush('vol');
    expectSameBytes(fs.readFileSync(b), fs.readFileSync(a), 'leg 1');
  });
});

describe('mirror: messages', () => {
  it('accepts resync-rate and refuses anything else', async () => {
    const [a, b] = [img('a'), img('b')];
    await dm.create('vol', { table: `0 ${LEN} mirror core 2 ${REGION} nosync 2 ${a} 0 ${b} 0` });
    expect(await dm.message('vol', 0, ['resync-rate', '1048576'])).toBe('');
    await expect(dm.message('vol', 0, ['resync-rate', 'fast'])).rejects.toThrow("invalid resync rate 'fast' (expected a non-negative integer)");
    await expect(dm.message('vol', 0, ['resync-rate'])).rejects.toThrow('missing resync rate');
    await expect(dm.message('vol', 0, ['resync-rate', '1', '2'])).rejects.toThrow("too many arguments (unexpected '2')");
    await expect(dm.message('vol', 0, ['rebuild'])).rejects.toThrow("unknown message 'rebuild' (expected resync-rate <bytes/s>)");
  });
});

describe('mirror: constructor errors', () => {
  let a: string;
  let b: string;
  let log: string;
  let small: string;
  let tinyLog: string;
  let missing: string;

  beforeEach(() => {
    a = img('a');
    b = img('b');
    log = blank('log', 4096);
    small = img('small', LEN - 1);
    tinyLog = blank('tinylog', 512);
    missing = path.join(dir, 'missing');
  });

  const CASES: Array<[string, () => string, () => string]> = [
    ['no arguments', () => '', () => 'missing log type'],
    ['no log argument count', () => 'core', () => 'missing log argument count'],
    ['bad log argument count', () => 'core x', () => "invalid log argument count 'x' (expected a non-negative integer)"],
    ['too few log arguments', () => 'core 2 64', () => 'not enough log arguments (expected 2, got 1)'],
    ['unknown log type', () => `foo 1 64 2 ${a} 0 ${b} 0`, () => "unknown dirty log type 'foo' (expected one of core, disk)"],
    ['core with 0 arguments', () => `core 0 2 ${a} 0 ${b} 0`, () => 'invalid core log argument count 0 (expected 1 or 2: <region_size> [sync|nosync])'],
    ['core with 3 arguments', () => `core 3 64 sync x 2 ${a} 0 ${b} 0`, () => 'invalid core log argument count 3 (expected 1 or 2: <region_size> [sync|nosync])'],
    ['region not a power of 2', () => `core 1 1000 2 ${a} 0 ${b} 0`, () => 'invalid region size 1000 (must be a power of 2, ≥ 8 sectors)'],
    ['region below 8', () => `core 1 4 2 ${a} 0 ${b} 0`, () => 'invalid region size 4 (must be a power of 2, ≥ 8 sectors)'],
    ['region not a number', () => `core 1 64k 2 ${a} 0 ${b} 0`, () => "invalid region size '64k' (expected a non-negative integer)"],
    ['region above the length', () => `core 1 8192 2 ${a} 0 ${b} 0`, () => `invalid region size 8192 (must not exceed the target length of ${LEN} sectors)`],
    ['bad sync argument', () => `core 2 64 maybe 2 ${a} 0 ${b} 0`, () => "invalid sync argument 'maybe' (expected sync or nosync)"],
    ['disk with 1 argument', () => `disk 1 ${log} 2 ${a} 0 ${b} 0`, () => 'invalid disk log argument count 1 (expected 2 or 3: <log_dev> <region_size> [sync|nosync])'],
    ['missing log device', () => `disk 2 ${missing} 64 2 ${a} 0 ${b} 0`, () => `device lookup failed: ${missing}: no such file or device`],
    ['log device too small', () => `disk 2 ${tinyLog} 64 2 ${a} 0 ${b} 0`, () => `log device too small: ${tinyLog} has 1 sectors, needs 3 for ${NR} regions`],
    ['no leg count', () => 'core 1 64', () => 'missing number of legs'],
    ['one leg', () => `core 1 64 1 ${a} 0`, () => "invalid number of legs '1' (expected an integer from 2 to 9)"],
    ['ten legs', () => `core 1 64 10 ${a} 0`, () => "invalid number of legs '10' (expected an integer from 2 to 9)"],
    ['too few leg arguments', () => `core 1 64 2 ${a} 0`, () => 'not enough leg arguments (expected 4 for 2 legs, got 2)'],
    ['bad leg offset', () => `core 1 64 2 ${a} 0 ${b} -1`, () => "invalid leg 1 offset '-1' (expected a non-negative integer)"],
    ['missing leg', () => `core 1 64 2 ${a} 0 ${missing} 0`, () => `device lookup failed: ${missing}: no such file or device`],
    ['leg too small', () => `core 1 64 2 ${a} 0 ${small} 0`, () => `device too small for target: ${small} has ${LEN - 1} sectors, needs ${LEN} (offset 0 + length ${LEN})`],
    ['leg offset past the end', () => `core 1 64 2 ${a} 1 ${b} 0`, () => `device too small for target: ${a} has ${LEN} sectors, needs ${LEN + 1} (offset 1 + length ${LEN})`],
    ['bad feature count', () => `core 1 64 2 ${a} 0 ${b} 0 x`, () => "invalid feature count 'x' (expected a non-negative integer)"],
    ['too few features', () => `core 1 64 2 ${a} 0 ${b} 0 2 handle_errors`, () => 'not enough features (expected 2, got 1)'],
    ['unknown feature', () => `core 1 64 2 ${a} 0 ${b} 0 1 sync_reads`, () => "unknown feature 'sync_reads' (expected handle_errors or keep_log)"],
    ['keep_log alone', () => `core 1 64 2 ${a} 0 ${b} 0 1 keep_log`, () => 'keep_log requires handle_errors'],
    ['trailing argument', () => `core 1 64 2 ${a} 0 ${b} 0 1 handle_errors extra`, () => "too many arguments (unexpected 'extra')"],
  ];

  it.each(CASES)('%s', async (_what, args, message) => {
    const table = `0 ${LEN} mirror ${args()}`.trimEnd();
    await expect(dm.create('vol', { table })).rejects.toThrow(`vol: line 1: mirror: ${message()}`);
    expect(dm.has('vol')).toBe(false);
  });

  it('releases every device it opened when it fails', async () => {
    await expect(dm.create('vol', { table: `0 ${LEN} mirror disk 2 ${log} 64 2 ${a} 0 ${b} 0 1 keep_log` })).rejects.toThrow('keep_log');
    const other = new DeviceMapper();
    try {
      // a second engine can lock every file again
      await other.create('x', { table: `0 ${LEN} mirror disk 2 ${log} 64 2 ${a} 0 ${b} 0` });
    } finally {
      await other.close();
    }
  });
});

/**
 * docs/howto/seeding.md, run as written (every ```sh block, in order, in one bash; see
 * helpers/howto-shell.ts): a site seeded from a shipped image, a third site seeded from
 * the second site's copy. After the blocks the test checks, independently of the howto's
 * own `cmp`:
 *
 *  - each resync copied only the regions written after that site's seeding point
 *    (`--json` `resyncedBytes` = those regions' bytes, far below the device), and each
 *    site was shipped nothing before its slink was resumed;
 *  - site A's, B's and C's images equal a model of what the howto wrote (data.raw, then
 *    the two `qemu-io` patterns).
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT, cleanup, daemonPid, isAlive, type Sandbox } from '../helpers/daemon.ts';
import { openHowto, shellBlocks, type Output, type Shell } from '../helpers/howto-shell.ts';
import { requireTools } from '../helpers/nbd-tools.ts';
import type { ProgressItem } from '../../src/daemon/protocol.ts';
import { progressText } from '../../tools/cli/format.ts';

const HOWTO = path.join(ROOT, 'docs', 'howto', 'seeding.md');
const MiB = 1 << 20;
const REGION = 512 * 1024;

let sb: Sandbox;
let D: string;
let shell: Shell;

beforeAll(() => {
  requireTools(['nbdcopy', 'qemu-io', 'cmp', 'bash']);
  ({ sb, D, shell } = openHowto('seeding-howto'));
});

afterAll(async () => {
  await shell?.close();
  await cleanup(sb);
});

function line(out: string, name: string): string {
  const l = out.split('\n').find((x) => x.startsWith(`${name}: `));
  if (!l) throw new Error(`no status line of ${name} in:\n${out}`);
  return l.slice(name.length + 2);
}

/** `"resyncedBytes": N` per remote slink, from the howto's grep of `status --json` */
function resynced(out: string): Record<number, number> {
  const got: Record<number, number> = {};
  let slink = -1;
  for (const l of out.split('\n')) {
    const s = /"slink": (\d+)/.exec(l);
    if (s) slink = Number(s[1]);
    const r = /"resyncedBytes": (\d+)/.exec(l);
    if (r) got[slink] = Number(r[1]);
  }
  return got;
}

/**
 * One `wait --progress` line in a pipe, as tools/cli/format.ts progressText prints it:
 * `repl: resync DONE/TOTAL sectors (P%), RATE, ETA T`, RATE `N B/s` or `N.N KiB/s` (MiB,
 * GiB, TiB), T `m:ss`, `h:mm:ss` or `-` (no rate measured yet). Groups: done, total, percent.
 */
const PROGRESS_LINE = /^repl: resync (\d+)\/(\d+) sectors \((\d+)%\), (?:\d+ B|\d+\.\d (?:KiB|MiB|GiB|TiB))\/s, ETA (?:-|\d+:\d\d|\d+:\d\d:\d\d)$/;

/** a `wait --progress` in a pipe: resync lines ending at 100%, or nothing left to wait for */
function expectProgress(stderr: string): void {
  const lines = stderr.trimEnd().split('\n');
  if (lines.length === 1 && lines[0] === 'repl: no background work; nothing to wait for') return;
  for (const l of lines) expect(l).toMatch(PROGRESS_LINE);
  const [, done, total, percent] = PROGRESS_LINE.exec(lines.at(-1)!)!;
  expect([done, percent]).toEqual([total, '100']);
}

describe('the progress lines this test accepts', () => {
  const item = (done: number, rate: number, eta: number | null): ProgressItem =>
    ({ name: 'repl', work: 'resync', doneSectors: done, totalSectors: 65536, percent: Math.floor((done * 100) / 65536), rate, eta });
  const print = (...items: ProgressItem[]): string => items.map((p) => `repl: ${progressText(p)}\n`).join('');

  it('are wait --progress\'s lines as the CLI formats them, ending at 100%', () => {
    expectProgress(print(item(0, 0, null), item(16384, 900, 55), item(32768, 3.5 * MiB, 4000), item(65536, 12.25 * MiB, 0)));
    expectProgress(print(item(65536, 2 * 1024 ** 3, 0)));
    expectProgress('repl: no background work; nothing to wait for\n');
  });

  it('refuse a line without rate and ETA, a garbled one, or a last line short of 100%', () => {
    expect(() => expectProgress('repl: resync 65536/65536 sectors (100%)\n')).toThrow();
    expect(() => expectProgress('repl: resync 65536/65536 sectors (100%), 1.0 MiB/s\n')).toThrow();
    expect(() => expectProgress('repl: resync 65536/65536 sectors (100%), 1.0 MiB/s, ETA 0:00 extra\n')).toThrow();
    expect(() => expectProgress('vol0: resync 65536/65536 sectors (100%), 1.0 MiB/s, ETA 0:00\n')).toThrow();
    expect(() => expectProgress('repl: resync 65536/65536 sectors (100%), fast, ETA 0:00\n')).toThrow();
    expect(() => expectProgress(print(item(65536, MiB, 0)) + 'repl: something else\n')).toThrow();
    expect(() => expectProgress(print(item(32768, MiB, 30)))).toThrow();
  });
});

describe('docs/howto/seeding.md, as written', () => {
  it('seeds site B from a shipped image and site C from B\'s copy; each resync copies only later writes', { timeout: 600_000 }, async () => {
    const blocks = shellBlocks(fs.readFileSync(HOWTO, 'utf8'));
    let next = 0;
    const step = async (key: string): Promise<Output> => {
      const block = blocks[next++];
      expect(block, `block ${next} of the howto`).toContain(key);
      const out = await shell.run(block!);
      if (process.env.HOWTO_ECHO) process.stdout.write(`--- block ${next}\n${out.stdout}${out.stderr}`);
      return out;
    };

    await step('truncate -s 32M a0.img b0.img c0.img');
    expect(isAlive(daemonPid(sb))).toBe(true);
    const group = await step('slink suspend 2');
    expect(line(group.stdout, 'repl')).toBe('0 1 replicator 0:S,0,0 1:D,0,0 2:D,0,0 0/4096');
    expect(line(group.stdout, 'vol0')).toBe('0 65536 replicator-dev A,1/1 D,0/64 D,0/64');
    await step('head -c 32M /dev/urandom > data.raw');

    const p1 = await step('clear-bitmap 1');
    expect(p1.stdout).toBe('0 65536 replicator-dev A,1/1 D,64/64 D,0/64\n');
    const b0 = fs.readFileSync(path.join(D, 'b0.img'));
    expect(b0.equals(Buffer.alloc(32 * MiB)), 'site B got nothing while suspended').toBe(true);

    const later1 = await step("write -P 0x5b 4M 3M");
    expect(later1.stdout).toContain('wrote 3145728/3145728 bytes at offset 4194304');
    await step('nbdcopy seed-b0.img');
    const liveB = await step('slink resume 1');
    expect(line(liveB.stdout, 'repl')).toBe('0 1 replicator 0:S,0,0 1:A,0,0 2:D,0,0 0/4096');
    expect(line(liveB.stdout, 'vol0')).toBe('0 65536 replicator-dev A,1/1 A,64/64 D,0/64');
    // only the regions written after site B's seeding point: 3 MiB at 4 MiB = 6 regions
    expect(resynced(liveB.stdout)).toEqual({ 1: 6 * REGION, 2: 0 });
    expect((await step('cmp a0.img b0.img')).stdout).toBe('site B is identical to site A\n');

    const p2 = await step('clear-bitmap 2');
    expect(line(p2.stdout, 'repl')).toBe('0 1 replicator 0:S,0,0 1:D,0,0 2:D,0,0 0/4096');
    expect(line(p2.stdout, 'vol0')).toBe('0 65536 replicator-dev A,1/1 D,64/64 D,64/64');
    const c0 = fs.readFileSync(path.join(D, 'c0.img'));
    expect(c0.equals(Buffer.alloc(32 * MiB)), 'site C got nothing while suspended').toBe(true);
    const later2 = await step('nbdcopy "nbd+unix:///siteb0?$NBD" seed-c0.img');
    expect(later2.stdout).toContain('wrote 3145728/3145728 bytes at offset 20971520');
    const liveC = await step('slink resume 2');
    expectProgress(liveC.stderr);
    expect(line(liveC.stdout, 'repl')).toBe('0 1 replicator 0:S,0,0 1:A,0,0 2:A,0,0 0/4096');
    expect(line(liveC.stdout, 'vol0')).toBe('0 65536 replicator-dev A,1/1 A,64/64 A,64/64');
    const after = resynced(liveC.stdout);
    expect(after[2], 'site C: only the regions written after its seeding point').toBe(6 * REGION);
    // site B got the second 3 MiB in order or, had the ring overflowed first, by a resync of those regions
    expect([6 * REGION, 12 * REGION]).toContain(after[1]);
    expect((await step('cmp a0.img c0.img')).stdout).toBe('sites B and C are identical to site A\n');

    // independently: the images against what the howto wrote
    const model = fs.readFileSync(path.join(D, 'data.raw'));
    model.fill(0x5b, 4 * MiB, 7 * MiB);
    model.fill(0x5c, 20 * MiB, 23 * MiB);
    for (const f of ['a0.img', 'b0.img', 'c0.img']) {
      expect(fs.readFileSync(path.join(D, f)).equals(model), `${f} holds what was written to vol0`).toBe(true);
    }

    const pid = daemonPid(sb);
    await step('dmkit remove vol0 repl siteb0 sitec0');
    for (const end = Date.now() + 15_000; isAlive(pid) && Date.now() < end; ) await new Promise((r) => setTimeout(r, 50));
    expect(isAlive(pid)).toBe(false);
    expect(next, 'every sh block of the howto ran').toBe(blocks.length);
  });
});

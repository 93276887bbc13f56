/**
 * docs/howto/replicate.md, run as written: every ```sh block of the howto, in order, in one
 * bash (`-e`: a failing command fails the test), with `dmkit` on PATH (bin/dmkit.js) and
 * TMPDIR pointing into a sandbox, so the howto's scratch directory, its daemon's runtime and
 * state dirs all live there. After each block the test checks what it printed, and at the
 * end it compares site B's images with site A's and with a model of what the howto wrote
 * (its own data files), independently of the howto's `cmp`.
 *
 *   images → site B devices → local mirror → replicator → replicator-devs (first copy)
 *   → data over NBD (nbdcopy, qemu-io) → site B fails (error tables), the ring overflows
 *   → the daemon restarts → site B comes back, resync → cmp → clean up
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT, cleanup, daemonPid, isAlive, type Sandbox } from '../helpers/daemon.ts';
import { freePort, openHowto, shellBlocks, type Output, type Shell } from '../helpers/howto-shell.ts';
import { requireTools } from '../helpers/nbd-tools.ts';

const HOWTO = path.join(ROOT, 'docs', 'howto', 'replicate.md');
const MiB = 1 << 20;

let sb: Sandbox;
let D: string;
let shell: Shell;

beforeAll(async () => {
  requireTools(['nbdcopy', 'qemu-io', 'cmp', 'bash']);
  // the howto's own scratch dir and daemon: ${TMPDIR}/replicate-howto/{run,state}; §11's
  // receiving daemon listens on ${PORT:-7788}: a free port here, so runs never collide
  ({ sb, D, shell } = openHowto('replicate-howto', { PORT: String(await freePort()) }));
});

afterAll(async () => {
  await shell?.close();
  await cleanup(sb);
});

/** the status line of `name` in a `dmkit status A B …` listing */
function statusOf(out: string, name: string): string {
  const line = out.split('\n').find((l) => l.startsWith(`${name}: `));
  if (!line) throw new Error(`no status line of ${name} in:\n${out}`);
  return line.slice(name.length + 2);
}

/**
 * `wait --progress repl` in a pipe: resync lines ending at 100%, or nothing to wait for if
 * it was done before it looked. (The total is the resync's own: it grows when a device is
 * bound during a pass, so it is not checked against the devices' size.)
 */
function expectProgress(stderr: string): void {
  const lines = stderr.trimEnd().split('\n');
  if (lines.length === 1 && lines[0] === 'repl: no background work; nothing to wait for') return;
  for (const line of lines) expect(line).toMatch(/^repl: resync \d+\/\d+ sectors \(\d+%\), \d+(\.\d)? (B|KiB|MiB|GiB)\/s, ETA (-|\d+:\d\d(:\d\d)?)$/);
  expect(lines.at(-1)).toMatch(/^repl: resync (\d+)\/\1 sectors \(100%\), .*, ETA 0:00$/);
}

describe('docs/howto/replicate.md, as written', () => {
  it('replicates a group to a second site through failure, restart and resync; site B ends identical', { timeout: 600_000 }, async () => {
    const blocks = shellBlocks(fs.readFileSync(HOWTO, 'utf8'));
    expect(blocks.length).toBeGreaterThanOrEqual(15);
    const seen = new Set<string>();
    /** run the next block, which must contain `key`, and return its output */
    let next = 0;
    const step = async (key: string): Promise<Output> => {
      const i = next++;
      const block = blocks[i];
      expect(block, `block ${i + 1} of the howto`).toContain(key);
      seen.add(key);
      const out = await shell.run(block!);
      if (process.env.HOWTO_ECHO) process.stdout.write(`--- block ${i + 1}\n${out.stdout}${out.stderr}`);
      return out;
    };

    await step('export DMKIT_RUNTIME_DIR=$D/run');
    await step('truncate -s 64M a0.img');
    for (const f of ['a0.img', 'a0m.img', 'a1.img', 'b0.img', 'b1.img']) expect(fs.statSync(path.join(D, f)).size).toBe(64 * MiB);
    expect(fs.statSync(path.join(D, 'rlog')).size).toBe(16 * MiB);

    await step('dmkit create siteb0');
    expect(isAlive(daemonPid(sb))).toBe(true); // autostarted in the howto's runtime dir
    const m0 = await step('dmkit create m0');
    expect(m0.stderr).toMatch(/^(m0: no background work; nothing to wait for\n|(m0: resync \d+\/131072 sectors \(\d+%\), [^\n]*\n)+)$/);

    await step('dmkit create repl');
    expect((await step('dmkit status repl')).stdout).toBe('0 1 replicator 0:S,0,0 1:A,0,0 0/32768\n');
    expect((await step('resync-rate')).stdout).toBe('');

    await step('dmkit create vol0');
    const first = await step('dmkit wait --progress repl');
    expectProgress(first.stderr);
    expect(statusOf(first.stdout, 'repl')).toBe('0 1 replicator 0:S,0,0 1:A,0,0 0/32768');
    expect(statusOf(first.stdout, 'vol0')).toBe('0 131072 replicator-dev A,1/1 A,128/128');
    expect(statusOf(first.stdout, 'vol1')).toBe('0 131072 replicator-dev A,1/1 A,128/128');
    expect(statusOf(first.stdout, 'm0')).toBe(`0 131072 mirror 2 ${D}/a0.img ${D}/a0m.img 128/128 1 AA 3 disk ${D}/m0.log A`);

    const tree = (await step('dmkit ls --tree')).stdout;
    expect(tree).toMatch(/^vol0 \(253:\d+\)\n ├─repl \(253:\d+\)\n/);
    expect(tree).toContain(`(${D}/b1.dlog)`);

    const data = await step('nbdcopy data.raw');
    expect(data.stdout).toContain('wrote 4194304/4194304 bytes at offset 8388608');
    expect(data.stdout.trimEnd().split('\n').at(-1)).toMatch(/^0 1 replicator 0:S,0,0 1:[AF],\d+,\d+ \d+\/32768$/);

    const json = (await step('dmkit status --json repl')).stdout;
    expect(json).toContain('"state": "asynchronous"');
    expect(json).toContain('"consistent": true');

    const down = await step('--table "0 131072 error"');
    expect(down.stdout).toContain('wrote 1048576/1048576 bytes at offset 0');
    expect(statusOf(down.stdout, 'repl')).toMatch(/^0 1 replicator 0:S,0,0 1:D,\d+,\d+ \d+\/32768$/);
    expect(statusOf(down.stdout, 'vol0')).toMatch(/^0 131072 replicator-dev A,1\/1 D,\d+\/128$/);
    expect(statusOf(down.stdout, 'vol1')).toMatch(/^0 131072 replicator-dev A,1\/1 D,\d+\/128$/);
    expect((await step("grep 'Event number'")).stdout).toMatch(/^Event number: +\d+\n$/);

    const before = daemonPid(sb);
    const restarted = await step('kill $(cat $DMKIT_RUNTIME_DIR/daemon.pid)');
    expect(daemonPid(sb)).not.toBe(before);
    // the ring overflowed: 1 MiB of vol0 (2 regions) and 24 MiB of vol1 (48 regions) are out of sync, kept by the disk logs
    expect(statusOf(restarted.stdout, 'vol0')).toBe('0 131072 replicator-dev A,1/1 D,126/128');
    expect(statusOf(restarted.stdout, 'vol1')).toBe('0 131072 replicator-dev A,1/1 D,80/128');

    const back = await step('--table "0 131072 linear $D/b0.img 0"');
    expectProgress(back.stderr);
    expect(statusOf(back.stdout, 'repl')).toBe('0 1 replicator 0:S,0,0 1:A,0,0 0/32768');
    expect(statusOf(back.stdout, 'vol0')).toBe('0 131072 replicator-dev A,1/1 A,128/128');
    expect(statusOf(back.stdout, 'vol1')).toBe('0 131072 replicator-dev A,1/1 A,128/128');

    expect((await step('cmp a0.img b0.img')).stdout).toBe('site B is identical to site A\n');

    // independently: every image against what the howto wrote
    const read = (f: string): Buffer => fs.readFileSync(path.join(D, f));
    const vol0 = Buffer.alloc(64 * MiB);
    read('data.raw').copy(vol0, 0);
    vol0.fill(0xcd, 0, MiB);
    const vol1 = Buffer.alloc(64 * MiB);
    vol1.fill(0xab, 8 * MiB, 12 * MiB);
    read('more.raw').copy(vol1, 0);
    for (const f of ['a0.img', 'a0m.img', 'b0.img']) expect(read(f).equals(vol0), `${f} holds what was written to vol0`).toBe(true);
    for (const f of ['a1.img', 'b1.img']) expect(read(f).equals(vol1), `${f} holds what was written to vol1`).toBe(true);

    const pid = daemonPid(sb);
    await step('dmkit remove vol0 vol1 repl m0 siteb0 siteb1');
    for (const end = Date.now() + 15_000; isAlive(pid) && Date.now() < end; ) await new Promise((r) => setTimeout(r, 50));
    expect(isAlive(pid)).toBe(false);

    // §11: two daemons, replication over tcp (TLS, lz4)
    await step('--replication-listen 127.0.0.1:${PORT:-7788}');
    const pidB = Number(fs.readFileSync(path.join(D, 'b', 'run', 'daemon.pid'), 'utf8'));
    expect(isAlive(pidB)).toBe(true);
    expect(fs.statSync(path.join(D, 'b', 'site.key')).mode & 0o777).toBe(0o600);
    await step('tcp 6 1 async peer=127.0.0.1:${PORT:-7788}');
    const link = await step("dmkit info repl | grep 'Slink 1'");
    expect(link.stdout).toMatch(/^Slink 1: +\S+, connected to 127\.0\.0\.1:\d+, \d+ bytes on the wire/);
    const role = await step('dmkit info data0 | grep Role');
    expect(role.stdout).toMatch(/^Role: +secondary, receiving replication stream [0-9a-f]{32}\.1 \(writes refused: EROFS\)\n/);
    expect(role.stdout).toContain("site B's disk is identical to site A's\n");
    const payload = fs.readFileSync(path.join(D, 'a', 'payload.raw'));
    const diskB = fs.readFileSync(path.join(D, 'b', 'disk0.img'));
    expect(diskB.subarray(0, payload.length).equals(payload), 'site B holds what was written at site A').toBe(true);
    expect(diskB.subarray(payload.length).equals(Buffer.alloc(diskB.length - payload.length))).toBe(true);
    await step('dmkit remove data0');
    for (const end = Date.now() + 15_000; isAlive(pidB) && Date.now() < end; ) await new Promise((r) => setTimeout(r, 50));
    expect(isAlive(pidB)).toBe(false);
    expect(next, 'every sh block of the howto ran').toBe(blocks.length);
    expect(seen.size).toBe(blocks.length);
  });
});

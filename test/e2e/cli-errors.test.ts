/**
 * Bad input through the real CLI: every failure exits 1 with `dmkit: <the reason>` on
 * stderr and nothing on stdout, leaves no device and no changed image behind, and the
 * daemon keeps serving (same pid).
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, daemonPid, dmkit, image, ok, sandbox, type Result, type Sandbox } from '../helpers/daemon.ts';

let sb: Sandbox;
let a: string;
let small: string;
let pid: number;

const digest = (f: string): string => createHash('sha256').update(fs.readFileSync(f)).digest('hex');
const fails = (stderr: string) => expect.objectContaining({ code: 1, stdout: '', stderr: `dmkit: ${stderr}\n` });
const run = (...cmds: string[][]): Promise<Result[]> => Promise.all(cmds.map((c) => dmkit(sb, c)));

beforeAll(() => {
  sb = sandbox();
  a = image(sb, 'a.img', 1 << 20, (i) => (i * 7) & 0xff);
  small = image(sb, 'small.img', 4096);
});
afterAll(() => cleanup(sb));

describe('dmkit failures', () => {
  it('does not start a daemon with --no-autostart', async () => {
    // its own exit status (3), so scripts need not parse the message
    expect(await dmkit(sb, ['--no-autostart', 'ls'])).toEqual(expect.objectContaining({
      code: 3, stdout: '', stderr: `dmkit: no daemon is running (nothing listens on ${sb.socket}); start one with 'dmkit daemon' or leave out --no-autostart\n`,
    }));
    expect(fs.existsSync(sb.socket)).toBe(false);
    await ok(sb, ['create', 'vol', '--table', `0 1024 linear ${a} 0`]);
    pid = daemonPid(sb);
  });

  it('refuses malformed tables with the line, the target and the argument', async () => {
    const before = digest(a);
    const results = await run(
      ['create', 'bad', '--table', '0 10 zero\n20 10 zero'],
      ['create', 'bad', '--table', '0 0 zero'],
      ['create', 'bad', '--table', '0 10 nosuch'],
      ['create', 'bad', '--table', 'x 10 zero'],
      ['create', 'bad', '--table', `0 10 linear ${a}`],
      ['create', 'bad', '--table', `0 10 linear ${a} zz`],
      ['create', 'bad', '--table', `0 16 linear ${small} 0`],
      ['create', 'bad', '--table', '0 10 linear /no/such/file 0'],
      ['load', 'vol', '--table', '# nothing but a comment\n'],
    );
    expect(results).toEqual([
      fails('bad: line 2: zero: gap in table: target starts at 20, expected 10'),
      fails('bad: line 1: zero: zero-length target'),
      fails("bad: line 1: nosuch: unknown target type 'nosuch'"),
      fails("bad: line 1: invalid start sector 'x' (expected a non-negative integer)"),
      fails('bad: line 1: linear: invalid argument count (expected <dev> <offset>)'),
      expect.objectContaining({ code: 1, stdout: '', stderr: expect.stringMatching(/^dmkit: bad: line 1: linear: .*'zz'.*\n$/) }),
      fails(`bad: line 1: linear: device too small for target: ${small} has 8 sectors, needs 16 (offset 0 + length 16)`),
      fails('bad: line 1: linear: device lookup failed: /no/such/file: no such file or device'),
      fails('vol: line 0: table has no targets'),
    ]);
    expect(await ok(sb, ['ls'])).toBe('vol\t(253:0)\n');
    expect(await ok(sb, ['info', 'vol'])).toContain('Tables present:    LIVE\n');
    expect(digest(a)).toBe(before);
  });

  it('rolls a failed create back whole: no device, image untouched and not held', async () => {
    const before = digest(a);
    const r = await dmkit(sb, ['create', 'half', '--table', `0 8 linear ${a} 1024\n8 8 linear ${small} 4`]);
    expect(r).toEqual(fails(`half: line 2: linear: device too small for target: ${small} has 8 sectors, needs 12 (offset 4 + length 8)`));
    expect(await ok(sb, ['ls'])).toBe('vol\t(253:0)\n');
    expect(digest(a)).toBe(before);
    // the image is free again: a new device can use it, and removing that one leaves vol as it was
    await ok(sb, ['create', 'half', '--table', `0 8 linear ${a} 1024`]);
    await ok(sb, ['remove', 'half']);
    expect(await ok(sb, ['ls'])).toBe('vol\t(253:0)\n');
  });

  it('refuses bad arguments and options', async () => {
    const table = `${sb.dir}/t.table`;
    fs.writeFileSync(table, '0 8 zero\n');
    expect(await run(
      ['frobnicate'],
      ['create'],
      ['create', 'x', table, '--table', '0 8 zero'],
      ['create', 'x', '--notable', '--table', '0 8 zero'],
      ['create', 'x', `${sb.dir}/missing.table`],
      ['load', 'vol', '--notable'],
      ['message', 'vol', 'x', 'hello'],
      ['wait', 'vol', 'soon'],
      ['daemon', '--nbd-listen', 'nowhere'],
      ['daemon', '--tls', 'maybe'],
      ['daemon', '--nbd-threads', 'two'],
      ['daemon', '--nbd-threads', '65'],
    )).toEqual([
      fails("unknown command 'frobnicate'"),
      fails("missing required argument 'name'"),
      fails('create: give the table either with --table or as TABLE_FILE, not both'),
      fails('create: --notable cannot be combined with a table'),
      fails(`create: cannot read table file ${sb.dir}/missing.table: ENOENT`),
      fails('--notable only available when creating new device.'),
      fails("invalid sector 'x' (expected a non-negative integer)"),
      fails("invalid event number 'soon' (expected a non-negative integer)"),
      fails("--nbd-listen: expected HOST:PORT, [IPv6]:PORT or PORT (e.g. 127.0.0.1:10809), got 'nowhere'"),
      fails("option '--tls <mode>' argument 'maybe' is invalid. Allowed choices are on, require."),
      fails("--nbd-threads: expected a whole number of threads from 0 to 64, got 'two'"),
      fails("--nbd-threads: expected a whole number of threads from 0 to 64, got '65'"),
    ]);
  });

  it('names the unknown device, the refused message and the failing step', async () => {
    const [info, both, msg, outside, dup, uuid, badName] = await run(
      ['info', 'nope'], ['info', 'vol', 'nope'],
      ['message', 'vol', '0', 'hello'], ['message', 'vol', '5000', 'hello'],
      ['create', 'vol', '--table', '0 8 zero'], ['create', 'u', '-u', 'bad uuid', '--notable'], ['create', 'a/b', '--notable'],
    );
    expect(info).toEqual(fails('nope: no such device'));
    expect(both).toMatchObject({ code: 1, stderr: 'dmkit: nope: no such device\n' });
    expect(both.stdout).toContain('Name:              vol\n');
    expect(msg).toEqual(fails('vol: linear target does not accept messages'));
    expect(outside).toEqual(fails('vol: message sector 5000 is outside the device (0–1023)'));
    expect(dup).toEqual(fails('vol: device already exists'));
    expect(uuid).toEqual(fails("invalid uuid 'bad uuid' (1–128 printable characters)"));
    expect(badName).toEqual(fails("invalid device name 'a/b' (1–127 characters, no '/')"));
  });

  it('keeps the same daemon serving throughout', async () => {
    expect(daemonPid(sb)).toBe(pid);
    expect(await ok(sb, ['ls'])).toBe('vol\t(253:0)\n');
    expect(await ok(sb, ['table', 'vol'])).toBe(`0 1024 linear ${a} 0\n`);
  });
});

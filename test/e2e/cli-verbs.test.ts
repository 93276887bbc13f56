/**
 * Every verb through the real CLI and daemon, outputs compared byte for byte with
 * dmsetup's formats. One daemon (autostarted by the first command) for the whole file;
 * the tests run in order and build on each other's devices. Read-only commands of one
 * step run concurrently.
 */
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, dmkit, image, ok, sandbox, type Sandbox } from '../helpers/daemon.ts';

const PKG = JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
const HEAD = 'Name             Maj Min Stat Open Targ Event  UUID                            \n';
const row = (name: string, min: number, stat: string, open: number, targ: number, ev: number, uuid = ''): string =>
  `${name.padEnd(16)} 253 ${String(min).padStart(3)} ${stat} ${String(open).padStart(4)} ${String(targ).padStart(4)} ${String(ev).padStart(6)} ${uuid.padEnd(32)}\n`;

let sb: Sandbox;
let a: string;
let b: string;

/** run commands concurrently (read-only ones); their outputs in order */
const outs = (...cmds: string[][]): Promise<string[]> => Promise.all(cmds.map((c) => ok(sb, c)));

beforeAll(() => {
  sb = sandbox();
  a = image(sb, 'a.img', 1 << 20);
  b = image(sb, 'b.img', 1 << 20);
});
afterAll(() => cleanup(sb));

describe('dmkit verbs', () => {
  it('lists nothing on a fresh daemon', async () => {
    expect(await ok(sb, ['ls'])).toBe('No devices found\n');
    expect(await outs(['info', '-c'], ['table'], ['ls', '--tree'], ['ls', '--json'])).toEqual([...Array(3).fill('No devices found\n'), '[]\n']);
  });

  it('creates from a table file, --table and stdin', async () => {
    fs.writeFileSync(`${sb.dir}/vol.table`, `# a comment\n0 2048 linear ${a} 0\n`);
    expect(await ok(sb, ['create', 'vol', `${sb.dir}/vol.table`])).toBe('');
    expect(await ok(sb, ['create', 'z', '--table', '0 100 zero', '-u', 'uuid-z'])).toBe('');
    expect(await ok(sb, ['create', 'pipe'], { input: '0 8 zero\n8 8 error\n' })).toBe('');
    expect(await ok(sb, ['ls'])).toBe('pipe\t(253:2)\nvol\t(253:0)\nz\t(253:1)\n');
  });

  it('prints info in the long and the column form', async () => {
    const [long, cols, one] = await outs(['info'], ['info', '-c'], ['info', '-C', '--noheadings', 'z']);
    const block = (name: string, minor: number, targets: number, uuid?: string): string =>
      `Name:              ${name}\n`
      + 'State:             ACTIVE\n'
      + 'Tables present:    LIVE\n'
      + 'Open count:        0\n'
      + 'Event number:      0\n'
      + `Major, minor:      253, ${minor}\n`
      + `Number of targets: ${targets}\n`
      + (uuid ? `UUID: ${uuid}\n` : '')
      + '\n';
    expect(long).toBe(block('pipe', 2, 2) + block('vol', 0, 1) + block('z', 1, 1, 'uuid-z'));
    expect(cols).toBe(HEAD + row('pipe', 2, 'L--w', 0, 2, 0) + row('vol', 0, 'L--w', 0, 1, 0) + row('z', 1, 'L--w', 0, 1, 0, 'uuid-z'));
    expect(one).toBe(row('z', 1, 'L--w', 0, 1, 0, 'uuid-z'));
  });

  it('prints tables and status with dmsetup\'s NAME: prefix rules', async () => {
    const r = await outs(['table', 'pipe'], ['table', 'vol', 'z'], ['table'], ['table', '--target', 'error'], ['status'], ['table', '--json', 'vol']);
    expect(r.slice(0, 5)).toEqual([
      '0 8 zero \n8 8 error \n',
      `vol: 0 2048 linear ${a} 0\nz: 0 100 zero \n`,
      `pipe: 0 8 zero \npipe: 8 8 error \nvol: 0 2048 linear ${a} 0\nz: 0 100 zero \n`,
      'pipe: 8 8 error \n',
      'pipe: 0 8 zero \npipe: 8 8 error \nvol: 0 2048 linear \nz: 0 100 zero \n',
    ]);
    expect(JSON.parse(r[5]!)).toEqual([{ name: 'vol', lines: [{ start: 0, length: 2048, type: 'linear', params: `${a} 0` }] }]);
  });

  it('prints deps, targets and versions', async () => {
    const [deps, all, json, targets, tjson, version] = await outs(['deps', 'vol'], ['deps'], ['deps', '--json', 'vol'], ['targets'], ['targets', '--json'], ['version']);
    expect(deps).toBe(`1 dependencies\t: (${a})\n`);
    expect(all).toBe(`pipe: 0 dependencies\t:\nvol: 1 dependencies\t: (${a})\nz: 0 dependencies\t:\n`);
    expect(JSON.parse(json)).toEqual([{ name: 'vol', deps: [a] }]);
    for (const line of ['linear           v1.4.0', 'zero             v1.2.0', 'error            v1.7.0']) expect(targets.split('\n')).toContain(line);
    for (const line of targets.trimEnd().split('\n')) expect(line).toMatch(/^[A-Za-z0-9_.-]+ +v\d+\.\d+\.\d+$/);
    expect(JSON.parse(tjson)).toContainEqual({ name: 'linear', version: [1, 4, 0] });
    expect(version).toBe(`Library version:   ${PKG.version}\nDriver version:    ${PKG.version}\n`);
  });

  it('loads, clears, suspends and resumes', async () => {
    expect(await ok(sb, ['load', 'vol', '--table', `0 1024 linear ${b} 8`])).toBe('');
    const [info, inactive, deps, cols] = await outs(['info', 'vol'], ['table', '--inactive', 'vol'], ['deps', '--inactive', 'vol'], ['info', '-c', 'vol']);
    expect(info).toContain('Tables present:    LIVE & INACTIVE\n');
    expect(inactive).toBe(`0 1024 linear ${b} 8\n`);
    expect(deps).toBe(`1 dependencies\t: (${b})\n`);
    expect(cols).toBe(HEAD + row('vol', 0, 'LI-w', 0, 1, 0));
    expect(await ok(sb, ['clear', 'vol'])).toBe('');
    expect(await ok(sb, ['suspend', 'vol', 'z'])).toBe('');
    const [info2, cols2] = await outs(['info', 'vol'], ['info', '-c', 'vol', 'z']);
    expect(info2).toContain('State:             SUSPENDED\nTables present:    LIVE\n');
    expect(cols2).toBe(HEAD + row('vol', 0, 'L-sw', 0, 1, 0) + row('z', 1, 'L-sw', 0, 1, 0, 'uuid-z'));
    expect(await ok(sb, ['reload', 'z', '--table', '0 200 zero'])).toBe('');
    expect(await ok(sb, ['resume', 'vol', 'z'])).toBe('');
    expect(await outs(['info', '-c', 'vol', 'z'], ['table', 'z'])).toEqual([
      HEAD + row('vol', 0, 'L--w', 0, 1, 0) + row('z', 1, 'L--w', 0, 1, 0, 'uuid-z'), '0 200 zero \n']);
  });

  it('handles read-only devices and tables, and devices without a table', async () => {
    expect(await ok(sb, ['create', 'ro', '-r', '--table', '0 8 zero'])).toBe('');
    expect(await ok(sb, ['create', 'empty', '--notable'])).toBe('');
    await ok(sb, ['load', 'z', '-r', '--table', '0 200 zero']);
    const [ro, zInactive, empty, emptyTable, two] = await outs(['info', 'ro'], ['info', '-c', 'z'], ['info', 'empty'], ['table', 'empty'], ['table', 'empty', 'ro']);
    expect(ro).toContain('State:             ACTIVE (READ-ONLY)\n');
    expect(zInactive).toBe(HEAD + row('z', 1, 'LI-w', 0, 1, 0, 'uuid-z'));
    expect(empty).toBe('Name:              empty\nState:             ACTIVE\nTables present:    None\n'
      + 'Open count:        0\nEvent number:      0\nMajor, minor:      253, 4\nNumber of targets: 0\n\n');
    expect(emptyTable).toBe('\n');
    expect(two).toBe('empty: \nro: 0 8 zero \n');
    await ok(sb, ['resume', 'z']);
    expect(await ok(sb, ['info', '-c', '--noheadings', 'ro', 'z'])).toBe(row('ro', 3, 'L--r', 0, 1, 0) + row('z', 1, 'L--r', 0, 1, 0, 'uuid-z'));
    await ok(sb, ['remove', 'ro', 'empty']);
  });

  it('renames and sets a uuid once', async () => {
    expect(await ok(sb, ['rename', 'pipe', 'pipe2'])).toBe('');
    expect(await ok(sb, ['rename', 'pipe2', '--setuuid', 'uuid-p'])).toBe('');
    expect(await ok(sb, ['info', '-c', 'pipe2'])).toBe(HEAD + row('pipe2', 2, 'L--w', 0, 2, 0, 'uuid-p'));
    expect(await dmkit(sb, ['rename', 'pipe2', '--setuuid', 'other']))
      .toMatchObject({ code: 1, stdout: '', stderr: 'dmkit: pipe2: uuid is already set (uuid-p) and cannot change\n' });
  });

  it('shows stacking with ls --tree and ls --target, and refuses to remove what is held', async () => {
    await ok(sb, ['create', 'top', '--table', '0 1024 linear dm:vol 512\n1024 1024 linear dm:vol 0']);
    const [tree, ascii, target, deps, cols, json] = await Promise.all([
      ok(sb, ['ls', '--tree']),
      dmkit(sb, ['ls', '--tree'], { env: { LANG: 'C', LC_ALL: 'C' } }).then((r) => r.stdout),
      ok(sb, ['ls', '--target', 'linear']), ok(sb, ['deps', 'top']), ok(sb, ['info', '-c', 'vol']),
      ok(sb, ['ls', '--json']),
    ]);
    expect(tree).toBe(`pipe2 (253:2)\ntop (253:3)\n └─vol (253:0)\n    └─ (${a})\nz (253:1)\n`);
    expect(ascii).toBe(`pipe2 (253:2)\ntop (253:3)\n \`-vol (253:0)\n    \`- (${a})\nz (253:1)\n`);
    expect(target).toBe('top\t(253, 3)\nvol\t(253, 0)\n');
    expect(deps).toBe('1 dependencies\t: (dm:vol)\n');
    expect(cols).toBe(HEAD + row('vol', 0, 'L--w', 1, 1, 0));
    const list = JSON.parse(json) as Array<{ name: string; major: number; minor: number; openCount: number }>;
    expect(list.map((d) => [d.name, d.major, d.minor, d.openCount])).toEqual([['pipe2', 253, 2, 0], ['top', 253, 3, 0], ['vol', 253, 0, 1], ['z', 253, 1, 0]]);
    expect(list[1]).toMatchObject({ name: 'top', major: 253, minor: 3, state: 'ACTIVE', deps: ['dm:vol'], types: ['linear', 'linear'] });
    const [remove, rename] = await Promise.all([dmkit(sb, ['remove', 'vol']), dmkit(sb, ['rename', 'vol', 'vol2'])]);
    expect(remove).toMatchObject({ code: 1, stdout: '', stderr: 'dmkit: vol: device is busy (open count 1: used by dm:top)\n' });
    expect(rename).toMatchObject({ code: 1, stdout: '', stderr: 'dmkit: vol: cannot rename: the table of top refers to it as dm:vol\n' });
  });

  it('waits for an event number that differs', async () => {
    expect(await outs(['wait', 'vol', '7'], ['wait', '-v', 'vol', '3'])).toEqual(['', expect.stringContaining('Event number:      0\n')]);
  });

  it('removes deferred, forced, and all', async () => {
    expect(await ok(sb, ['remove', '--deferred', 'vol'])).toBe('');
    expect(await ok(sb, ['info', 'vol'])).toContain('State:             ACTIVE (DEFERRED REMOVE)\n');
    expect(await ok(sb, ['remove', '--retry', 'top'])).toBe('');
    expect(await ok(sb, ['ls'])).toBe('pipe2\t(253:2)\nz\t(253:1)\n');
    expect(await ok(sb, ['remove', '-f', 'pipe2'])).toBe('');
    expect(await ok(sb, ['remove_all'])).toBe('');
    expect(await ok(sb, ['ls'])).toBe('No devices found\n');
  });
});

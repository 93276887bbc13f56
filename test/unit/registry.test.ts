/**
 * The registry rules (src/core/registry.ts) as the engine applies them to target types:
 * duplicates refused, unregister refused while a table uses the type, sorted listing, and
 * external plugins loaded from a module path with `dm.loadPlugin`.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Registry } from '../../src/core/registry.ts';
import { DeviceMapper, DmError, type TargetType } from '../../src/index.ts';

let dir: string;
let dm: DeviceMapper;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-registry-'));
  dm = new DeviceMapper();
});

afterEach(async () => {
  await dm.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** a target type with no devices: reads return `fill`, writes succeed */
function filler(name: string, fill = 0xab): TargetType {
  return {
    name,
    version: [0, 1, 0],
    create: () => ({
      map: (bio) => {
        if (bio.op === 'read') bio.data.fill(fill);
        return Promise.resolve();
      },
      status: () => '',
    }),
  };
}

function failure(fn: () => unknown): DmError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(DmError);
    return err as DmError;
  }
  throw new Error('expected a DmError');
}

describe('Registry', () => {
  it('refuses a duplicate name', () => {
    const r = new Registry<{ name: string }>('widget');
    r.register({ name: 'a' });
    const err = failure(() => r.register({ name: 'a' }));
    expect(err.code).toBe('EEXIST');
    expect(err.message).toBe("widget 'a' is already registered");
  });

  it('refuses names outside [A-Za-z0-9_.-]{1,64}', () => {
    const r = new Registry<{ name: string }>('widget');
    for (const name of ['', 'a b', 'x'.repeat(65), 'a/b']) expect(failure(() => r.register({ name })).code).toBe('EINVAL');
    r.register({ name: 'ok_name-1.2' });
    expect(r.has('ok_name-1.2')).toBe(true);
  });

  it('lists by name, sorted', () => {
    const r = new Registry<{ name: string }>('widget');
    for (const name of ['mirror', 'error', 'zero', 'linear']) r.register({ name });
    expect(r.list().map((x) => x.name)).toEqual(['error', 'linear', 'mirror', 'zero']);
  });

  it('refuses to unregister an unknown name', () => {
    const r = new Registry<{ name: string }>('widget');
    const err = failure(() => r.unregister('nope'));
    expect(err.code).toBe('ENOENT');
  });

  it('counts uses; a release function counts once', () => {
    const r = new Registry<{ name: string }>('widget');
    r.register({ name: 'a' });
    const release = r.use('a');
    r.use('a');
    expect(r.uses('a')).toBe(2);
    release();
    release();
    expect(r.uses('a')).toBe(1);
  });
});

describe('engine target registry', () => {
  it('has the built-in targets, sorted', () => {
    const listed = dm.targets.list().map((t) => `${t.name} v${t.version.join('.')}`);
    expect(listed).toEqual([...listed].sort());
    expect(listed).toEqual(expect.arrayContaining([
      'delay v1.4.0', 'error v1.7.0', 'flakey v1.5.0', 'linear v1.4.0', 'striped v1.6.0', 'zero v1.2.0',
    ]));
  });

  it('refuses a second target type of a built-in name', () => {
    const err = failure(() => dm.targets.register(filler('zero')));
    expect(err.code).toBe('EEXIST');
    expect(err.message).toBe("target type 'zero' is already registered");
  });

  it('refuses to unregister a type while a table uses it, and allows it after', async () => {
    dm.targets.register(filler('pattern'));
    await dm.create('vol', { table: '0 8 pattern\n8 8 zero' });
    await dm.load('vol', '0 16 pattern');
    expect(dm.targets.uses('pattern')).toBe(2);
    const err = failure(() => dm.targets.unregister('pattern'));
    expect(err.code).toBe('EBUSY');
    expect(err.message).toBe("target type 'pattern' is in use by 2 instance(s)");
    await dm.clear('vol');
    expect(failure(() => dm.targets.unregister('pattern')).code).toBe('EBUSY');
    await dm.remove('vol');
    expect(dm.targets.uses('pattern')).toBe(0);
    dm.targets.unregister('pattern');
    expect(dm.targets.has('pattern')).toBe(false);
    await expect(dm.create('again', { table: '0 8 pattern' })).rejects.toThrow("again: line 1: pattern: unknown target type 'pattern'");
  });
});

describe('loadPlugin', () => {
  const PLUGIN = `
export default {
  name: 'fill',
  version: [2, 0, 1],
  create(ctx, args) {
    if (args.length !== 1 || !/^[0-9]+$/.test(args[0])) throw new Error('expected <byte>');
    const value = Number(args[0]);
    return {
      map(bio) {
        if (bio.op === 'read') bio.data.fill(value);
        return Promise.resolve();
      },
      status: (type) => (type === 'table' ? String(value) : ''),
    };
  },
};
`;

  it('loads a default-exported target type from a module path, usable in a table', async () => {
    const file = path.join(dir, 'fill-target.mjs');
    fs.writeFileSync(file, PLUGIN);
    expect(await dm.loadPlugin(file)).toEqual(['fill']);
    expect(dm.targets.list().map((t) => t.name)).toContain('fill');
    expect(dm.targets.get('fill')!.version).toEqual([2, 0, 1]);
    await dm.create('vol', { table: '0 8 fill 90\n8 8 zero' });
    const data = await dm.read('vol', 0, 16 * 512);
    expect(data.subarray(0, 4096).every((b) => b === 90)).toBe(true);
    expect(data.subarray(4096).every((b) => b === 0)).toBe(true);
    expect(dm.table('vol')[0]).toEqual({ start: 0, length: 8, type: 'fill', params: '90' });
    await expect(dm.create('bad', { table: '0 8 fill x' })).rejects.toThrow('bad: line 1: fill: expected <byte>');
  });

  it('loads a module with register(dm), and refuses to load the same types twice', async () => {
    const file = path.join(dir, 'two.mjs');
    fs.writeFileSync(file, `
const make = (name, v) => ({ name, version: [1, 0, 0], create: () => ({
  map: (bio) => { if (bio.op === 'read') bio.data.fill(v); return Promise.resolve(); },
  status: () => '',
}) });
export function register(dm) {
  dm.targets.register(make('ones', 1));
  dm.targets.register(make('twos', 2));
}
`);
    expect(await dm.loadPlugin(file)).toEqual(['ones', 'twos']);
    await dm.create('vol', { table: '0 1 ones\n1 1 twos' });
    expect([...(await dm.read('vol', 0, 1024)).subarray(510, 514)]).toEqual([1, 1, 2, 2]);
    await expect(dm.loadPlugin(file)).rejects.toThrow("target type 'ones' is already registered");
  });

  it('refuses a module that exports no target type', async () => {
    const file = path.join(dir, 'empty.mjs');
    fs.writeFileSync(file, 'export const nothing = 1;\n');
    await expect(dm.loadPlugin(file)).rejects.toThrow(
      `plugin ${file}: expected register(dm, api), arrays targets/dirtyLogs/slinks/replogs, or a default-exported target type ({name, version, create}) or array of them`);
  });
});

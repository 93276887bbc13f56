/**
 * The slink registry (src/slink/registry.ts): a type under its name and aliases, all or
 * none; the name the table gave kept on the slink; use counts on the type, whichever name
 * created the slink; an unknown type refused with the known names.
 */
import { describe, expect, it } from 'vitest';
import { TargetArgError } from '../../src/core/errors.ts';
import { log } from '../../src/core/log.ts';
import { createSlink, listSlinks, registerSlink, unregisterSlink } from '../../src/slink/registry.ts';
import type { SiteLinkType, SlinkContext } from '../../src/slink/types.ts';

let events = 0;
const sctx: SlinkContext = { device: 'repl', groupId: '00112233445566778899aabbccddeeff', event: () => void events++, log: log('slink-test') };

describe('slink registry', () => {
  /** a transport with no devices, recording the names it was created under */
  function testType(name: string, aliases?: string[]): SiteLinkType {
    return {
      name,
      aliases,
      create: (_ctx, slink, options) => ({
        type: name, slink, retestMs: 1000,
        attach: () => Promise.reject(new TargetArgError('no devices')),
        options: () => [...options],
        status: () => '',
        destroy: () => Promise.resolve(),
      }),
    };
  }

  const code = (fn: () => void): string | undefined => {
    try {
      fn();
    } catch (err) {
      return (err as { code?: string }).code;
    }
    return undefined;
  };

  it('lists blockdev and its alias local, sorted', () => {
    const names = listSlinks();
    expect(names).toContain('blockdev');
    expect(names).toContain('local');
    expect([...names].sort()).toEqual(names);
  });

  it('refuses an unknown type, listing the known ones', async () => {
    const err = await createSlink('nope', sctx, 1, []).then(() => null, (e: Error) => e);
    expect(err).toBeInstanceOf(TargetArgError);
    expect(err!.message).toBe(`unknown slink type 'nope' (expected one of ${listSlinks().join(', ')})`);
    expect(err!.message).toContain('blockdev, local');
  });

  it('registers a type under its name and aliases, all or none', async () => {
    expect(code(() => registerSlink(testType('blockdev')))).toBe('EEXIST');
    expect(code(() => registerSlink(testType('t1', ['local'])))).toBe('EEXIST');
    expect(listSlinks()).not.toContain('t1');
    expect(code(() => registerSlink(testType('t1', ['t1a', 'bad name'])))).toBe('EINVAL');
    expect(code(() => registerSlink(testType('t1', ['t1a', 't1a'])))).toBe('EINVAL');
    expect(listSlinks().filter((n) => n.startsWith('t1'))).toEqual([]);

    registerSlink(testType('t1', ['t1a', 't1b']));
    expect(listSlinks().filter((n) => n.startsWith('t1'))).toEqual(['t1', 't1a', 't1b']);
    const viaAlias = await createSlink('t1b', sctx, 2, ['x=1']);
    expect(viaAlias.type).toBe('t1b');
    expect(viaAlias.options()).toEqual(['x=1']);
    expect(code(() => unregisterSlink('t1a'))).toBe('EINVAL');
    expect(code(() => unregisterSlink('t1'))).toBe('EBUSY');
    await viaAlias.destroy();
    await viaAlias.destroy(); // released once
    unregisterSlink('t1');
    expect(listSlinks().filter((n) => n.startsWith('t1'))).toEqual([]);
    expect(code(() => unregisterSlink('t1'))).toBe('ENOENT');
    expect(code(() => unregisterSlink('t1a'))).toBe('ENOENT');
    registerSlink(testType('t1', ['t1a'])); // the names are free again
    unregisterSlink('t1');
  });

  it('releases the use count when create fails', async () => {
    registerSlink({ name: 't2', create: () => { throw new TargetArgError('refused'); } });
    await expect(createSlink('t2', sctx, 1, [])).rejects.toThrow('refused');
    unregisterSlink('t2');
  });

  it('refuses to unregister blockdev while a slink made as local exists', async () => {
    const l = await createSlink('local', sctx, 1, []);
    expect(code(() => unregisterSlink('blockdev'))).toBe('EBUSY');
    expect(code(() => unregisterSlink('local'))).toBe('EINVAL');
    await l.destroy();
    expect(events).toBe(0);
  });
});

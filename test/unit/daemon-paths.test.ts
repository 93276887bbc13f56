/**
 * Where the CLI looks for the daemon. Root's runtime dir is /run/dmkit even in a login
 * session that sets XDG_RUNTIME_DIR (ssh: /run/user/0), so root's CLI finds the daemon
 * systemd or Pacemaker started instead of autostarting a second one; other users keep
 * $XDG_RUNTIME_DIR/dmkit. DMKIT_RUNTIME_DIR overrides both.
 */
import { describe, expect, it } from 'vitest';
import { runtimeDir, stateDir } from '../../src/daemon/paths.ts';

const root = process.getuid?.() === 0;

describe('daemon paths', () => {
  it('DMKIT_RUNTIME_DIR and DMKIT_STATE_DIR win', () => {
    expect(runtimeDir({ DMKIT_RUNTIME_DIR: '/x/run', XDG_RUNTIME_DIR: '/run/user/7' })).toBe('/x/run');
    expect(stateDir({ DMKIT_STATE_DIR: '/x/state' })).toBe('/x/state');
  });

  it(`${root ? 'root: /run/dmkit even with XDG_RUNTIME_DIR set' : 'a user: $XDG_RUNTIME_DIR/dmkit'}`, () => {
    expect(runtimeDir({ XDG_RUNTIME_DIR: '/run/user/0' })).toBe(root ? '/run/dmkit' : '/run/user/0/dmkit');
    expect(runtimeDir({})).toBe(root ? '/run/dmkit' : `/tmp/dmkit-${process.getuid?.()}`);
    expect(stateDir({ HOME: '/home/u' })).toBe(root ? '/var/lib/dmkit' : '/home/u/.local/state/dmkit');
  });
});

/**
 * contrib/systemd (docs/howto/systemd.md): the unit passes `systemd-analyze verify` without
 * a single warning, its hardening scores as `systemd-analyze security --offline` says, the
 * tmpfiles.d entries create the directories with mode 0700, and the daemon run the way the
 * unit runs it (ExecStart's arguments, the unit's environment) stops cleanly on SIGTERM, so
 * Restart=on-failure leaves a stopped service stopped.
 *
 * `verify` needs ExecStart's binary to exist: the test checks a copy of the unit whose
 * ExecStart names this checkout's bin/dmkit.js, and that the copy differs in nothing else.
 * Where systemd-analyze is not installed the systemd checks are skipped (they say so).
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { cleanup, ok, ROOT, sandbox, waitGone } from '../helpers/daemon.ts';

const DIR = path.join(ROOT, 'contrib', 'systemd');
const UNIT = path.join(DIR, 'dmkit.service');
const CLI = path.join(ROOT, 'bin', 'dmkit.js');
const SHIPPED_BIN = '/usr/bin/dmkit';

const has = (tool: string): boolean => spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
const analyze = has('systemd-analyze');
const tmpfiles = has('systemd-tmpfiles');

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-systemd-'));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

function unitText(): string {
  return fs.readFileSync(UNIT, 'utf8');
}

/** `Key=value` lines of a section, in order */
function directives(text: string, section: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let current = '';
  for (const line of text.split('\n')) {
    const s = /^\[(.+)\]$/.exec(line.trim());
    if (s) current = s[1]!;
    else if (current === section && /^[A-Za-z]+=/.test(line)) {
      const i = line.indexOf('=');
      out.push([line.slice(0, i), line.slice(i + 1)]);
    }
  }
  return out;
}

function value(text: string, section: string, key: string): string[] {
  return directives(text, section).filter(([k]) => k === key).map(([, v]) => v);
}

/** the unit with ExecStart pointing at this checkout, in its own directory */
function localUnit(): string {
  const dir = fs.mkdtempSync(path.join(work, 'unit-'));
  const file = path.join(dir, 'dmkit.service');
  fs.writeFileSync(file, unitText().split(SHIPPED_BIN).join(CLI));
  return file;
}

describe('contrib/systemd/dmkit.service', () => {
  it('runs `dmkit daemon --foreground` from /usr/bin/dmkit with the state and runtime directories the CLI uses as root', () => {
    const text = unitText();
    expect(value(text, 'Service', 'ExecStart')).toEqual([`${SHIPPED_BIN} daemon --foreground $DMKIT_DAEMON_ARGS`]);
    expect(value(text, 'Service', 'EnvironmentFile')).toEqual(['-/etc/default/dmkit']);
    expect(value(text, 'Service', 'Environment')).toEqual(['DMKIT_RUNTIME_DIR=/run/dmkit DMKIT_STATE_DIR=/var/lib/dmkit']);
    expect(value(text, 'Service', 'RuntimeDirectory')).toEqual(['dmkit']);
    expect(value(text, 'Service', 'StateDirectory')).toEqual(['dmkit']);
    expect(value(text, 'Service', 'Restart')).toEqual(['on-failure']);
    expect(value(text, 'Service', 'KillMode')).toEqual(['mixed']);
    // the copy that verify checks differs only in ExecStart's binary
    const copy = fs.readFileSync(localUnit(), 'utf8');
    expect(copy.split(CLI).join(SHIPPED_BIN)).toBe(text);
  });

  it.skipIf(!analyze)('systemd-analyze verify prints nothing [needs systemd-analyze]', () => {
    const r = spawnSync('systemd-analyze', ['verify', localUnit()], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe('');
    expect(r.status).toBe(0);
  });

  it.skipIf(!analyze)('systemd-analyze verify does complain about a broken unit (the check above can fail)', () => {
    const file = localUnit();
    fs.writeFileSync(file, fs.readFileSync(file, 'utf8').replace('KillMode=mixed', 'KillMode=mixed\nProtectSytem=full'));
    const r = spawnSync('systemd-analyze', ['verify', file], { encoding: 'utf8' });
    expect(r.stderr).toMatch(/Unknown key 'ProtectSytem'/);
  });

  it.skipIf(!analyze)('hardening: systemd-analyze security --offline rates the exposure below 5 [needs systemd-analyze]', () => {
    const r = spawnSync('systemd-analyze', ['security', '--offline=yes', localUnit()], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    const m = /Overall exposure level for dmkit\.service: ([\d.]+)/.exec(r.stdout);
    expect(m, r.stdout + r.stderr).not.toBeNull();
    expect(Number(m![1])).toBeLessThan(5);
    // what dmkit needs stays allowed: TCP listeners, and no W^X rule that would stop V8's JIT
    const text = unitText();
    expect(value(text, 'Service', 'RestrictAddressFamilies')[0]!.split(' ')).toEqual(expect.arrayContaining(['AF_UNIX', 'AF_INET', 'AF_INET6']));
    expect(value(text, 'Service', 'MemoryDenyWriteExecute')).toEqual([]);
    expect(value(text, 'Service', 'PrivateDevices')).toEqual([]);
  });

  it('the daemon as the unit runs it answers, and SIGTERM ends it with status 0 after saving its devices', async () => {
    const sb = sandbox();
    try {
      // ExecStart's arguments with the sample env file's (empty) DMKIT_DAEMON_ARGS; the
      // unit's Environment= names /run and /var/lib, which the sandbox replaces
      const defaults = fs.readFileSync(path.join(DIR, 'dmkit.default'), 'utf8');
      expect(defaults).toMatch(/^DMKIT_DAEMON_ARGS=""$/m);
      const args = value(unitText(), 'Service', 'ExecStart')[0]!.split(' ').slice(1).filter((w) => w !== '$DMKIT_DAEMON_ARGS');
      expect(args).toEqual(['daemon', '--foreground']);
      const child = spawn(process.execPath, [CLI, ...args], { cwd: '/', env: sb.env, stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      for (let i = 0; !fs.existsSync(sb.socket); i++) {
        if (child.exitCode !== null || i > 600) throw new Error(`the daemon did not come up: ${stderr}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      await ok(sb, ['--no-autostart', 'create', 'z', '--table', '0 8 zero']);
      child.kill('SIGTERM');
      expect(await exited).toBe(0);
      await waitGone(child.pid!);
      expect(JSON.parse(fs.readFileSync(sb.stateFile, 'utf8')).devices.map((d: { name: string }) => d.name)).toEqual(['z']);
      expect(fs.existsSync(sb.socket)).toBe(false);
    } finally {
      await cleanup(sb);
    }
  }, 60_000);
});

describe('contrib/systemd/dmkit.conf (tmpfiles.d)', () => {
  it.skipIf(!tmpfiles)('creates /run/dmkit, /var/lib/dmkit and /etc/dmkit with mode 0700 [needs systemd-tmpfiles]', () => {
    const root = fs.mkdtempSync(path.join(work, 'root-'));
    const r = spawnSync('systemd-tmpfiles', ['--create', `--root=${root}`, path.join(DIR, 'dmkit.conf')], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    for (const d of ['run/dmkit', 'var/lib/dmkit', 'etc/dmkit']) {
      const st = fs.statSync(path.join(root, d));
      expect(st.isDirectory()).toBe(true);
      expect(st.mode & 0o777).toBe(0o700);
    }
  });
});

/**
 * The Pacemaker resource agent ocf/dmkit (docs/howto/pacemaker.md) against real daemons:
 * sites A and B run the failover howto's stack (a replicator `repl` with a tcp slink to
 * the other site, a replicator-dev `vol`), A primary, B secondary.
 *
 *  - meta-data validates against the OCF DTD (xmllint) and names the promotable actions;
 *  - resource-agents' ocf-tester passes against a second group of A's, `repl2`/`vol2`,
 *    primary and shipping to B (it starts, stops, promotes and demotes that group; it runs
 *    alongside the tests of `repl`);
 *  - the agent called directly (OCF_RESKEY_* in its environment): monitor says 7 / 0 / 8 for
 *    stopped / secondary / primary, promote and demote move the role (seen in `dmkit
 *    status --json`), start leaves a group that came up primary secondary, stop demotes;
 *  - promotion is refused, the role unchanged and the score removed, for a secondary in split
 *    brain and for one whose resync did not finish (inconsistent).
 *
 * Pacemaker itself is not here: the promotion scores the agent sets go to a stand-in
 * crm_attribute (HA_SBIN_DIR) that records its arguments. ocf-tester and xmllint must be
 * installed (Debian: resource-agents, libxml2-utils): without them this file fails.
 */
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ok, ROOT } from '../helpers/daemon.ts';
import { SiteDaemon, writeSecret } from '../helpers/site-daemon.ts';

const AGENT = path.join(ROOT, 'ocf', 'dmkit');
const CLI = path.join(ROOT, 'bin', 'dmkit.js');
const SECTORS = 4096; // 2 MiB
const BYTES = SECTORS * 512;
const REGION_BYTES = 64 * 512;
const OCF = { SUCCESS: 0, ERR_GENERIC: 1, ERR_INSTALLED: 5, ERR_CONFIGURED: 6, NOT_RUNNING: 7, RUNNING_PROMOTED: 8 };
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Run { code: number | null; stdout: string; stderr: string }

function run(cmd: string, args: string[], env: NodeJS.ProcessEnv, opts: { cwd?: string; input?: string } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: opts.cwd ?? ROOT, env, stdio: ['pipe', 'pipe', 'pipe'] });
    child.stdin.on('error', () => undefined);
    child.stdin.end(opts.input ?? '');
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

interface GroupJson { role: string; generation: string; consistent: boolean; splitBrain: string | null }

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-ocf-'));
/** a stand-in for Pacemaker's crm_attribute: appends its arguments to $DMKIT_TEST_SCORES */
const sbin = path.join(work, 'sbin');
fs.mkdirSync(sbin);
fs.writeFileSync(path.join(sbin, 'crm_attribute'), '#!/bin/sh\necho "$*" >> "$DMKIT_TEST_SCORES"\n', { mode: 0o755 });

/** the environment of an agent call: no DMKIT_* of ours (the parameters set them) */
function baseEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, OCF_ROOT: '/usr/lib/ocf' };
  for (const k of Object.keys(env)) if (k.startsWith('DMKIT_') || k.startsWith('OCF_RESKEY_') || k === 'NODE_OPTIONS') delete env[k];
  return env;
}

class Site {
  readonly d: SiteDaemon;
  readonly img: string;
  /** this "node"'s HA_RSCTMP and score log */
  readonly rsctmp: string;
  readonly scores: string;
  constructor(d: SiteDaemon, readonly label: string) {
    this.d = d;
    this.img = this.blank('local.img', BYTES);
    this.rsctmp = path.join(work, `rsctmp-${label}`);
    this.scores = path.join(work, `scores-${label}`);
    fs.mkdirSync(this.rsctmp);
    fs.writeFileSync(this.scores, '');
  }

  blank(name: string, bytes: number): string {
    const f = path.join(this.d.sb.dir, name);
    fs.writeFileSync(f, '');
    fs.truncateSync(f, bytes);
    return f;
  }

  /** the failover howto's stack: `repl` with a tcp slink to `peer`, `vol` over this site's image, sent to `remote` there */
  async stack(peer: string, standby: boolean, names = { repl: 'repl', vol: 'vol', remote: 'vol' }): Promise<void> {
    const { repl, vol, remote } = names;
    const w = ['1', 'async', 'retest=1', 'io-timeout=30', `peer=${peer}`, `secret=${secret}`];
    await ok(this.d.sb, ['create', repl, '--table', `0 1 replicator ringbuffer 4 ${this.blank(`${repl}.rlog`, 8 << 20)} 0 auto 16384 blockdev 1 0 tcp ${w.length} ${w.join(' ')}`]);
    if (standby) await ok(this.d.sb, ['demote', repl]);
    const img = vol === 'vol' ? this.img : this.blank(`${vol}.img`, BYTES);
    await ok(this.d.sb, ['create', vol, '--table', `0 ${SECTORS} replicator-dev dm:${repl} 0 0 1 ${img} nolog 0 1 1 ${remote} disk 3 ${this.blank(`${vol}.1.log`, 1 << 20)} 64 nosync`]);
  }

  async group(repl = 'repl'): Promise<GroupJson> {
    const out = JSON.parse(await ok(this.d.sb, ['status', '--json', repl])) as Array<{ lines: Array<{ detail: GroupJson }> }>;
    return out[0]!.lines[0]!.detail;
  }

  /** the same through the control protocol: for polling, without a CLI process per look */
  async peek(): Promise<GroupJson> {
    return (await this.d.request<{ replication: GroupJson }>('info', { name: 'repl' })).replication;
  }

  async role(repl = 'repl'): Promise<string> {
    return (await this.group(repl)).role;
  }

  async write(offset: number, bytes: number, vol = 'vol'): Promise<void> {
    const f = path.join(this.d.sb.dir, `w-${crypto.randomBytes(4).toString('hex')}`);
    fs.writeFileSync(f, crypto.randomBytes(bytes));
    await ok(this.d.sb, ['io', 'write', vol, String(offset), f]);
    fs.rmSync(f);
  }

  params(device = 'vol'): Record<string, string> {
    return { device, dmkit: CLI, runtime_dir: this.d.sb.runtimeDir, state_dir: this.d.sb.stateDir };
  }

  /** the agent's environment on this "node" */
  env(params: Record<string, string>, instance = 'dmkit-vol:0'): NodeJS.ProcessEnv {
    const env = baseEnv();
    for (const [k, v] of Object.entries(params)) env[`OCF_RESKEY_${k}`] = v;
    return {
      ...env, OCF_RESOURCE_INSTANCE: instance, OCF_RESKEY_CRM_meta_timeout: '60000', OCF_RESKEY_crm_feature_set: '3.16.0',
      HA_RSCTMP: this.rsctmp, HA_SBIN_DIR: sbin, DMKIT_TEST_SCORES: this.scores,
    };
  }

  agent(action: string, params: Record<string, string> = this.params(), instance?: string): Promise<Run> {
    return run(AGENT, [action], this.env(params, instance));
  }

  /** the agent's exit code for `action`; its output goes into the failure message otherwise */
  async rc(action: string, params?: Record<string, string>, instance?: string): Promise<number | null> {
    const r = await this.agent(action, params, instance);
    if (r.code !== 0 && r.code !== OCF.NOT_RUNNING && r.code !== OCF.RUNNING_PROMOTED) console.error(`${this.label} ${action} → ${r.code}\n${r.stderr}`);
    return r.code;
  }

  /** the last promotion-score call the agent made */
  lastScore(): string {
    const lines = fs.readFileSync(this.scores, 'utf8').trim().split('\n');
    return lines[lines.length - 1] ?? '';
  }

  clearScores(): void {
    fs.writeFileSync(this.scores, '');
  }
}

async function until<T>(what: string, probe: () => Promise<T>, cond: (v: T) => boolean, limitMs = 30_000): Promise<T> {
  for (const end = Date.now() + limitMs; ; await sleep(100)) {
    const v = await probe();
    if (cond(v)) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(v)}`);
  }
}

const daemons: SiteDaemon[] = [];
const secret = writeSecret(work);
let a: Site;
let b: Site;
/** ocf-tester's run against A's second group, started in beforeAll: it takes a while */
let tester: Promise<Run | Error>;
const TESTER_GROUP = { repl: 'repl2', vol: 'vol2', remote: 'vol2' };
const TESTER_INSTANCE = 'dmkit-vol2';
/**
 * ocf-tester, run as root, runs `meta-data` as user nobody: the agent is tested from a copy
 * (with its mode) in a directory anyone can enter, wherever this checkout is
 */
const TESTER_AGENT = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-ocf-agent-')), 'dmkit');
fs.chmodSync(path.dirname(TESTER_AGENT), 0o755);
fs.copyFileSync(AGENT, TESTER_AGENT);
fs.chmodSync(TESTER_AGENT, fs.statSync(AGENT).mode & 0o7777);

beforeAll(async () => {
  const ds = await Promise.all([0, 1].map(() => SiteDaemon.start({ secretFile: secret })));
  daemons.push(...ds);
  [a, b] = [new Site(ds[0]!, 'a'), new Site(ds[1]!, 'b')];
  // A (primary) ships vol and vol2 (two groups) to B (secondary)
  await b.stack(a.d.address, true);
  await b.stack(a.d.address, true, TESTER_GROUP);
  await a.stack(b.d.address, false);
  await a.stack(b.d.address, false, TESTER_GROUP);
  await Promise.all([a.write(0, BYTES), a.write(0, BYTES, 'vol2')]);
  const gen = (await a.group()).generation;
  await until('B to hold A\'s generation in order', () => b.peek(), (g) => g.generation === gen && g.consistent);

  const args = ['-n', TESTER_INSTANCE];
  for (const [k, v] of Object.entries(a.params('vol2'))) args.push('-o', `${k}=${v}`);
  // no HA_SBIN_DIR: Pacemaker's tools are absent, as on a machine running ocf-tester
  tester = run('ocf-tester', [...args, TESTER_AGENT], { ...baseEnv(), HA_RSCTMP: a.rsctmp }).catch((err: Error) => err);
});

afterAll(async () => {
  for (const d of daemons) await d.close();
  fs.rmSync(work, { recursive: true, force: true });
  fs.rmSync(path.dirname(TESTER_AGENT), { recursive: true, force: true });
});

describe('ocf/dmkit', () => {
  it('meta-data validates against the OCF DTD and declares a promotable agent', async () => {
    const md = await a.agent('meta-data');
    expect(md.code).toBe(0);
    // the DTD that ocf-tester validates against, shipped with resource-agents
    const dtdDir = '/usr/share/resource-agents';
    expect(fs.existsSync(path.join(dtdDir, 'ra-api-1.dtd'))).toBe(true);
    // as ocf-tester does it: from stdin, in the DTD's directory
    const lint = await run('xmllint', ['--noout', '--valid', '-'], baseEnv(), { cwd: dtdDir, input: md.stdout });
    expect(lint.stderr).toBe('');
    expect(lint.code).toBe(0);
    const actions = [...md.stdout.matchAll(/<action [^>]*\/>/g)].map(([tag]) => {
      const role = /role="([^"]+)"/.exec(tag)?.[1];
      return `${/name="([^"]+)"/.exec(tag)![1]}${role ? `:${role}` : ''}`;
    });
    expect(actions).toEqual(expect.arrayContaining(['start', 'stop', 'promote', 'demote', 'notify', 'monitor:Promoted', 'monitor:Unpromoted', 'validate-all', 'meta-data']));
    expect(md.stdout).toMatch(/<parameter name="device" unique="1" required="1">/);
    for (const p of ['dmkit', 'runtime_dir', 'state_dir', 'daemon_args']) expect(md.stdout).toContain(`<parameter name="${p}"`);
  });

  it('validate-all: the device parameter is required, the CLI must exist', async () => {
    expect(await a.rc('validate-all')).toBe(OCF.SUCCESS);
    const { device: _, ...noDevice } = a.params();
    const r = await a.agent('validate-all', noDevice);
    expect(r.code).toBe(OCF.ERR_CONFIGURED);
    expect(r.stderr).toMatch(/device parameter is required/);
    expect((await a.agent('validate-all', { ...a.params(), dmkit: path.join(work, 'no-such-dmkit') })).code).toBe(OCF.ERR_INSTALLED);
    expect((await a.agent('validate-all', { ...a.params(), runtime_dir: 'relative/dir' })).code).toBe(OCF.ERR_CONFIGURED);
  });

  it('monitor is 7 without a daemon or a device; start of a missing device fails', async () => {
    const empty = path.join(work, 'no-daemon');
    expect(await a.rc('monitor', { ...a.params(), runtime_dir: path.join(empty, 'run'), state_dir: path.join(empty, 'state') })).toBe(OCF.NOT_RUNNING);
    expect(fs.existsSync(path.join(empty, 'run', 'control.sock'))).toBe(false); // no daemon was autostarted
    expect(await a.rc('monitor', a.params('nosuch'))).toBe(OCF.NOT_RUNNING);
    const st = await a.agent('start', a.params('nosuch'));
    expect(st.code).toBe(OCF.ERR_INSTALLED);
    expect(st.stderr).toMatch(/nosuch does not exist/);
  }, 90_000);

  it('start leaves the group secondary (monitor 0), promote makes it primary (monitor 8), demote secondary again', async () => {
    expect(await a.role()).toBe('primary'); // as the stack was made
    a.clearScores();
    expect(await a.rc('start')).toBe(OCF.SUCCESS);
    expect(await a.role()).toBe('secondary');
    expect(await a.rc('monitor')).toBe(OCF.SUCCESS);
    expect(a.lastScore()).toBe('-p -v 1000'); // consistent secondary

    expect(await a.rc('promote')).toBe(OCF.SUCCESS);
    expect(await a.role()).toBe('primary');
    expect(await a.rc('monitor')).toBe(OCF.RUNNING_PROMOTED);
    expect(a.lastScore()).toBe('-p -v 10000');

    expect(await a.rc('demote')).toBe(OCF.SUCCESS);
    expect(await a.role()).toBe('secondary');
    expect(await a.rc('monitor')).toBe(OCF.SUCCESS);
    expect(a.lastScore()).toBe('-p -v 1000');

    // the replicator's own name works as well as a replicator-dev's
    expect(await a.rc('monitor', a.params('repl'))).toBe(OCF.SUCCESS);
  }, 90_000);

  it('start demotes a group that came up primary; stop demotes a primary; a primary is reported whoever made it', async () => {
    // a group that comes up primary is demoted by start (promotable clones start unpromoted)
    await ok(a.d.sb, ['promote', 'repl']);
    expect(await a.rc('monitor')).toBe(OCF.RUNNING_PROMOTED);
    expect(await a.rc('start')).toBe(OCF.SUCCESS);
    expect(await a.role()).toBe('secondary');

    // stop demotes a primary and leaves the daemon and the device
    expect(await a.rc('promote')).toBe(OCF.SUCCESS);
    expect(await a.rc('stop')).toBe(OCF.SUCCESS);
    expect(await a.role()).toBe('secondary');
    expect(a.lastScore()).toBe('-p -D');
    expect(await a.rc('monitor')).toBe(OCF.NOT_RUNNING);

    // a primary the cluster did not make is still reported as primary
    await ok(a.d.sb, ['promote', 'repl']);
    expect(await a.rc('monitor')).toBe(OCF.RUNNING_PROMOTED);

    // for what follows: A primary, B started (secondary)
    b.clearScores();
    expect(await b.rc('start')).toBe(OCF.SUCCESS);
    expect(b.lastScore()).toBe('-p -v 1000');
  }, 90_000);

  it('a secondary in split brain gets no promotion score and is not promoted', async () => {
    // A writes while its slink is suspended (a new generation); B is promoted, written and
    // demoted meanwhile; when A's slink resumes, B refuses A's stream: split brain
    await ok(a.d.sb, ['message', 'repl', '0', 'slink', 'suspend', '1']);
    await a.write(7 * REGION_BYTES, REGION_BYTES);
    await ok(b.d.sb, ['promote', 'repl', '--force']);
    await b.write(9 * REGION_BYTES, REGION_BYTES);
    await ok(b.d.sb, ['demote', 'repl']);
    await ok(a.d.sb, ['message', 'repl', '0', 'slink', 'resume', '1']);
    await until('B to see the split brain', () => b.peek(), (g) => g.splitBrain !== null);
    const before = await b.group();
    expect(before).toMatchObject({ role: 'secondary', consistent: true });

    b.clearScores();
    expect(await b.rc('monitor')).toBe(OCF.SUCCESS);
    expect(b.lastScore()).toBe('-p -D');
    const r = await b.agent('promote');
    expect(r.code).toBe(OCF.ERR_GENERIC);
    expect(r.stderr).toMatch(/refusing to promote: split brain/);
    const after = await b.group();
    expect(after.role).toBe('secondary');
    expect(after.generation).toBe(before.generation);
    expect(b.lastScore()).toBe('-p -D');
  }, 90_000);

  it('ocf-tester passes against the group repl2 of A (primary, shipping to B)', async () => {
    const r = await tester;
    if (r instanceof Error) throw new Error(`ocf-tester could not run (Debian package resource-agents): ${r.message}`);
    expect(`${r.stdout}${r.stderr}`).toContain(`${TESTER_AGENT} passed all tests`);
    expect(r.code).toBe(0);
    // it ends with stop: repl2 is secondary, and not running as far as the cluster goes
    expect(await a.role('repl2')).toBe('secondary');
    expect(await a.rc('monitor', a.params('vol2'), TESTER_INSTANCE)).toBe(OCF.NOT_RUNNING);
  }, 90_000);

  it('a secondary whose resync did not finish (inconsistent) gets no promotion score and is not promoted', async () => {
    // the split brain is resolved by discarding B's changes: A resyncs them into B, slowly,
    // and dies before it is done: B stays inconsistent
    await ok(a.d.sb, ['message', 'repl', '0', 'resync-rate', '4k']);
    await ok(b.d.sb, ['demote', 'repl', '--discard-my-data']);
    await until('B to take A\'s resync', () => b.peek(), (g) => !g.consistent && g.splitBrain === null);
    await a.d.kill();
    const before = await b.group();
    expect(before).toMatchObject({ role: 'secondary', consistent: false });

    b.clearScores();
    expect(await b.rc('monitor')).toBe(OCF.SUCCESS);
    expect(b.lastScore()).toBe('-p -D');
    const r = await b.agent('promote');
    expect(r.code).toBe(OCF.ERR_GENERIC);
    expect(r.stderr).toMatch(/refusing to promote: inconsistent/);
    expect(await b.role()).toBe('secondary');
    expect(await b.rc('monitor')).toBe(OCF.SUCCESS);
  }, 90_000);
});

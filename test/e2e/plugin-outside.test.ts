/**
 * Plugins that live outside the project, as a new user writes them: .mjs files in a fresh
 * directory under the system temp dir (no node_modules anywhere above them) that
 * `import … from 'dmkit'`. Loaded (a) by the library in-process with `dm.loadPlugin`, in
 * this test process and in a user's script run by Node with tsx, (b) by the real daemon
 * through the CLI (`dmkit daemon --plugin PATH`, sources under tsx), (c) by a daemon
 * running from an esbuild bundle of the CLI. Each time a device of the plugin's target
 * does real I/O, and the bytes are checked through the device and in the image file.
 *
 * Under vitest a plugin module is run by vite-node, which resolves `dmkit` by itself (to
 * another instance of the sources); only Node's own loader (the script, the daemons) goes
 * through dmkit's resolve hook, so the identity of the API is checked there.
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DeviceMapper, DmError, listReplogs, listSlinks, unregisterReplog, unregisterSlink } from '../../src/index.ts';
import { ROOT, cleanup, dmkit, ok, pattern, sandbox, type Sandbox } from '../helpers/daemon.ts';

const SECTORS = 256;
const BYTES = SECTORS * 512;
const KEY = 0x5a;

/** The README's example, verbatim. */
const README_PLUGIN = `// my-target.mjs — load with \`dmkit daemon --plugin ./my-target.mjs\` or dm.loadPlugin(path)
import { ArgReader } from 'dmkit';
export default {
  name: 'ones', version: [1, 0, 0],
  create(ctx, args) {
    new ArgReader(args, 'ones').expectEnd();
    return { map: async (bio) => { if (bio.op === 'read') bio.data.fill(0xff); }, status: () => '' };
  },
};
`;

/**
 * \`xor <dev> <key>\`: a mapping onto <dev> that stores every byte XORed with <key>; and a
 * dirty log type wrapping \`core\`, which a mirror creates through the engine's registry.
 */
const XOR_PLUGIN = `import { ArgReader, createDirtyLog } from 'dmkit';
const xorInto = (src, key) => { const out = Buffer.from(src); for (let i = 0; i < out.length; i++) out[i] ^= key; return out; };
export let logsCreated = 0;
export const targets = [{
  name: 'xor', version: [1, 1, 0],
  async create(ctx, args) {
    const r = new ArgReader(args, 'xor');
    const ref = r.next('device');
    const key = r.uint('key', { max: 255 });
    r.expectEnd();
    const dev = await ctx.open(ref);
    return {
      map(bio) {
        if (bio.op === 'write') return dev.submit({ ...bio, data: xorInto(bio.data, key) });
        if (bio.op !== 'read') return dev.submit(bio);
        return dev.submit(bio).then(() => { for (let i = 0; i < bio.data.length; i++) bio.data[i] ^= key; });
      },
      status: (type) => (type === 'table' ? dev.ref + ' ' + key : ''),
    };
  },
}];
export const dirtyLogs = [{
  name: 'plugin-core',
  create(ctx, args, length) { logsCreated++; return createDirtyLog('core', ctx, args, length); },
}];
`;

/** register(dm, api): records whether the API argument and \`import * from 'dmkit'\` are the engine's own objects. */
const REGISTER_PLUGIN = `import * as dmkit from 'dmkit';
import dmkitDefault from 'dmkit';
export const identity = {};
export function register(dm, api) {
  identity.dm = dm instanceof dmkit.DeviceMapper;
  identity.api = api.ArgReader === dmkit.ArgReader && api.TargetArgError === dmkit.TargetArgError && api.registerDirtyLog === dmkit.registerDirtyLog;
  identity.default = dmkitDefault?.ArgReader === dmkit.ArgReader;
  api.registerTarget({
    name: 'const', version: [0, 0, 1],
    create(ctx, args) {
      const r = new api.ArgReader(args, 'const');
      const value = r.uint('byte', { max: 255 });
      r.expectEnd();
      return { map: async (bio) => { if (bio.op === 'read') bio.data.fill(value); }, status: (t) => (t === 'table' ? String(value) : '') };
    },
  });
}
`;

let pluginDir: string;
const plugin = (name: string): string => path.join(pluginDir, name);

beforeAll(() => {
  pluginDir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-plugin-'));
  expect(path.relative(ROOT, pluginDir).startsWith('..')).toBe(true);
  fs.writeFileSync(plugin('my-target.mjs'), README_PLUGIN);
  fs.writeFileSync(plugin('xor.mjs'), XOR_PLUGIN);
  fs.writeFileSync(plugin('register.mjs'), REGISTER_PLUGIN);
  // registers through dmkit's own function when imported, and exports nothing
  fs.writeFileSync(plugin('side-effect.mjs'), `import { createDirtyLog, registerDirtyLog } from 'dmkit';
registerDirtyLog({ name: 'side-log', create: (ctx, args, length) => createDirtyLog('core', ctx, args, length) });
`);
  fs.writeFileSync(plugin('bad-arg.mjs'), `import { ArgReader } from 'dmkit';
export const targets = [{ name: 'strict', version: [1, 0, 0], create: (ctx, args) => { new ArgReader(args, 'strict').expectEnd(); return { map: async () => {}, status: () => '' }; } }];
export const dirtyLogs = [{ name: 'no-create' }];
`);
});

afterAll(() => {
  fs.rmSync(pluginDir, { recursive: true, force: true });
});

const xored = (data: Buffer): Buffer => Buffer.from(data.map((b) => b ^ KEY));

describe('(a) the library loads a plugin from outside the project', () => {
  let dir: string;
  let dm: DeviceMapper;

  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-plugin-lib-'));
    dm = new DeviceMapper();
  });

  afterAll(async () => {
    await dm.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("the README's example: import { ArgReader } from 'dmkit' resolves, the target reads 0xff", async () => {
    expect(await dm.loadPlugin(plugin('my-target.mjs'))).toEqual(['ones']);
    await dm.create('ones', { table: `0 16 ones` });
    expect((await dm.read('ones', 0, 16 * 512)).every((b) => b === 0xff)).toBe(true);
    // the plugin's ArgReader is the engine's: its error is a TargetArgError with the table's prefix
    const err = await dm.create('bad', { table: '0 8 ones extra' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DmError);
    expect((err as Error).message).toBe("bad: line 1: ones: too many arguments (unexpected 'extra')");
  });

  it('targets and dirty logs from one module: a xor device stores XORed bytes; a mirror uses the plugin log', async () => {
    expect(await dm.loadPlugin(plugin('xor.mjs'))).toEqual(['xor', 'dirtylog:plugin-core']);
    const img = path.join(dir, 'x.img');
    fs.writeFileSync(img, Buffer.alloc(BYTES));
    await dm.create('x', { table: `0 ${SECTORS} xor ${img} ${KEY}` });
    const data = pattern(BYTES, 3);
    await dm.write('x', 0, data);
    await dm.flush('x');
    expect(fs.readFileSync(img).equals(xored(data))).toBe(true);
    expect((await dm.read('x', 0, BYTES)).equals(data)).toBe(true);
    expect(dm.table('x')[0]!.params).toBe(`${img} ${KEY}`);

    const [a, b] = [path.join(dir, 'a.img'), path.join(dir, 'b.img')];
    for (const f of [a, b]) fs.writeFileSync(f, Buffer.alloc(BYTES));
    await dm.create('m', { table: `0 ${SECTORS} mirror plugin-core 2 64 nosync 2 ${a} 0 ${b} 0` });
    const mod = (await import(plugin('xor.mjs'))) as { logsCreated: number };
    expect(mod.logsCreated).toBe(1);
    const md = pattern(8192, 4);
    await dm.write('m', 4096, md);
    await dm.flush('m');
    for (const f of [a, b]) expect(fs.readFileSync(f).subarray(4096, 4096 + 8192).equals(md)).toBe(true);
  });

  it('register(dm, api): api.registerTarget adds to this engine', async () => {
    expect(await dm.loadPlugin(plugin('register.mjs'))).toEqual(['const']);
    await dm.create('c', { table: '0 8 const 7' });
    expect((await dm.read('c', 0, 4096)).every((x) => x === 7)).toBe(true);
    await expect(dm.create('c2', { table: '0 8 const 300' })).rejects.toThrow(/^c2: line 1: const: .*byte.*300/);
  });

  it("a user's script run by Node (tsx): 'dmkit' in the plugin and the api argument are the engine's own objects", async () => {
    const script = path.join(pluginDir, 'user-script.mts');
    fs.writeFileSync(script, `import { DeviceMapper } from ${JSON.stringify(path.join(ROOT, 'src', 'index.ts'))};
const dm = new DeviceMapper();
const names = [];
for (const f of ['register.mjs', 'xor.mjs', 'side-effect.mjs']) names.push(...await dm.loadPlugin(${JSON.stringify(pluginDir)} + '/' + f));
const { identity } = await import(${JSON.stringify(plugin('register.mjs'))});
await dm.create('c', { table: '0 8 const 7' });
const sevens = (await dm.read('c', 0, 4096)).every((b) => b === 7);
await dm.close();
process.stdout.write(JSON.stringify({ names, identity, sevens }));
`);
    const tsx = createRequire(path.join(ROOT, 'package.json')).resolve('tsx');
    const out = await new Promise<string>((resolve, reject) => {
      execFile(process.execPath, ['--import', pathToFileURL(tsx).href, script], { cwd: pluginDir, env: { ...process.env, NODE_OPTIONS: '' } },
        (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout)));
    });
    expect(JSON.parse(out)).toEqual({
      names: ['const', 'xor', 'dirtylog:plugin-core', 'dirtylog:side-log'], identity: { dm: true, api: true, default: true }, sevens: true,
    });
  });

  it('a bad module registers nothing (all or none)', async () => {
    await expect(dm.loadPlugin(plugin('bad-arg.mjs'))).rejects.toThrow(`plugin ${plugin('bad-arg.mjs')}: dirtyLogs[0] is not a dirty log type ({name, create})`);
    expect(dm.targets.get('strict')).toBeUndefined();
  });

  it('slink types from a plugin reach the slink registry', async () => {
    const file = plugin('slink.mjs');
    fs.writeFileSync(file, `export const slinks = [{ name: 'plugin-link', aliases: ['plugin-alias'], create() { throw new Error('not used'); } }];\n`);
    expect(await dm.loadPlugin(file)).toEqual(['slink:plugin-alias', 'slink:plugin-link']);
    expect(listSlinks()).toEqual(expect.arrayContaining(['plugin-link', 'plugin-alias']));
    unregisterSlink('plugin-link');
  });

  it('replog types from a plugin reach the replog registry; a failed load takes them back', async () => {
    const file = plugin('replog.mjs');
    fs.writeFileSync(file, `export function register(dm, api) {
  api.registerReplog({ name: 'plugin-ring', create() { throw new Error('not used'); } });
  api.registerTarget({ name: 'linear', version: [9, 9, 9], create() {} }); // refused: built in
}\n`);
    await expect(dm.loadPlugin(file)).rejects.toThrow("target type 'linear' is already registered");
    expect(listReplogs()).not.toContain('plugin-ring');
    fs.writeFileSync(file, `export const replogs = [{ name: 'plugin-ring', create() { throw new Error('not used'); } }];\n`);
    const again = plugin('replog2.mjs'); // a module is loaded once per URL: a new file
    fs.copyFileSync(file, again);
    expect(await dm.loadPlugin(again)).toEqual(['replog:plugin-ring']);
    expect(listReplogs()).toContain('plugin-ring');
    unregisterReplog('plugin-ring');
  });
});

/** write `data` at 0 through the daemon, read it back, check the image holds it XORed */
async function xorRoundTrip(sb: Sandbox, img: string, seed: number): Promise<void> {
  const data = pattern(BYTES, seed);
  expect(await dmkit(sb, ['io', 'write', 'x', '0'], { input: data })).toMatchObject({ code: 0, stderr: '' });
  expect(await dmkit(sb, ['io', 'flush', 'x'])).toMatchObject({ code: 0, stderr: '' });
  const back = await dmkit(sb, ['io', 'read', 'x', '0', String(BYTES)]);
  expect(back.code).toBe(0);
  expect(back.raw.equals(data)).toBe(true);
  expect(fs.readFileSync(img).equals(xored(data))).toBe(true);
  const ones = await dmkit(sb, ['io', 'read', 'ones', '0', '4096']);
  expect(ones.raw.length === 4096 && ones.raw.every((b) => b === 0xff)).toBe(true);
}

describe('(b) the daemon started by the CLI loads plugins from outside the project', () => {
  let sb: Sandbox;
  beforeAll(() => {
    sb = sandbox();
  });
  afterAll(async () => {
    await cleanup(sb);
  });

  it('dmkit daemon --plugin PATH…: the targets are listed and do I/O', async () => {
    expect(await dmkit(sb, ['daemon', '--plugin', plugin('my-target.mjs'), '--plugin', plugin('xor.mjs')])).toMatchObject({ code: 0, stderr: '' });
    const targets = await ok(sb, ['targets']);
    expect(targets).toMatch(/^ones +v1\.0\.0$/m);
    expect(targets).toMatch(/^xor +v1\.1\.0$/m);
    const img = path.join(sb.dir, 'x.img');
    fs.writeFileSync(img, Buffer.alloc(BYTES));
    await ok(sb, ['create', 'x', '--table', `0 ${SECTORS} xor ${img} ${KEY}`]);
    await ok(sb, ['create', 'ones', '--table', '0 8 ones']);
    await xorRoundTrip(sb, img, 5);
  });
});

describe('(c) a daemon running from the esbuild bundle loads plugins from outside the project', () => {
  let sb: Sandbox;
  let out: string;
  beforeAll(async () => {
    sb = sandbox();
    out = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-bundle-'));
    // the bundle keeps packages external: they resolve from the project's node_modules
    fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(out, 'node_modules'));
    const build = spawn(process.execPath, [path.join(ROOT, 'tools', 'build.mjs'), out], { cwd: ROOT, stdio: 'inherit' });
    expect(await new Promise((resolve) => build.on('exit', resolve))).toBe(0);
  });
  afterAll(async () => {
    await cleanup(sb);
    fs.rmSync(out, { recursive: true, force: true });
  });

  it('node BUNDLE daemon --foreground --plugin PATH…: the targets do I/O', async () => {
    const args = [path.join(out, 'dmkit.mjs'), 'daemon', '--foreground', '--nbd-threads', '0',
      '--plugin', plugin('my-target.mjs'), '--plugin', plugin('xor.mjs')];
    const daemon = spawn(process.execPath, args, { cwd: os.tmpdir(), env: sb.env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    daemon.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<void>((resolve) => daemon.on('exit', () => resolve()));
    try {
      for (const end = Date.now() + 20_000; !stderr.includes('listening on') && daemon.exitCode === null && Date.now() < end; ) {
        await new Promise((r) => setTimeout(r, 25));
      }
      expect(stderr).toContain(`plugin ${plugin('xor.mjs')}: registered xor, dirtylog:plugin-core`);
      expect(stderr).toContain('listening on');
      const img = path.join(sb.dir, 'x.img');
      fs.writeFileSync(img, Buffer.alloc(BYTES));
      await ok(sb, ['--no-autostart', 'create', 'x', '--table', `0 ${SECTORS} xor ${img} ${KEY}`]);
      await ok(sb, ['--no-autostart', 'create', 'ones', '--table', '0 8 ones']);
      await xorRoundTrip(sb, img, 6);
    } finally {
      daemon.kill('SIGTERM');
      await exited;
    }
  });
});

/**
 * /metrics of a real daemon (`dmkit daemon --http-listen 127.0.0.1:0`) with a replicated
 * group (a replicator and a replicator-dev with a blockdev slink to an image file):
 * `promtool check metrics` passes on scrapes taken while a writer runs; the numbers are the
 * engine's (I/O counts and bytes of a known set of writes, a suspended site's lag in ios
 * and bytes, its state, its dirty regions); a real Prometheus server scrapes the daemon and
 * a PromQL query returns the site's lag; a tcp site (a second daemon receiving, lz4) shows
 * its bytes on the wire both ways and its compression; the shipped alert rules pass
 * `promtool check rules` and their unit tests.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ControlClient } from '../../src/daemon/client.ts';
import { cleanup, client, image, ok, pattern, ROOT, sandbox, type Sandbox } from '../helpers/daemon.ts';
import { freePort } from '../helpers/howto-shell.ts';
import { SiteDaemon } from '../helpers/site-daemon.ts';

const SECTORS = 16384; // 8 MiB
const REGION = 64; // sectors: 32 KiB regions
const RING = 8192;

let sb: Sandbox;
let cl: ControlClient;
let base: string;
let prom: ChildProcess | null = null;

function tool(name: string): string {
  const r = spawnSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${name} is not installed (Debian package prometheus; .ci/run installs it)`);
  return r.stdout.trim();
}

async function scrape(): Promise<string> {
  const r = await fetch(`${base}/metrics`);
  expect(r.status).toBe(200);
  expect(r.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  return r.text();
}

/** the value of the one sample of `name` whose labels include `labels` */
function sample(text: string, name: string, labels: Record<string, string>): number {
  const hits = text.split('\n').filter((l) => {
    const m = /^([a-z_:]+)\{(.*)\} (\S+)$/.exec(l);
    if (!m || m[1] !== name) return false;
    return Object.entries(labels).every(([k, v]) => m[2]!.split(/,(?=[a-z_]+=")/).includes(`${k}="${v}"`));
  });
  if (hits.length !== 1) throw new Error(`${hits.length} samples of ${name}${JSON.stringify(labels)}`);
  return Number(hits[0]!.split(' ').at(-1));
}

function promtoolCheck(text: string): { status: number | null; out: string } {
  const r = spawnSync(tool('promtool'), ['check', 'metrics'], { input: text, encoding: 'utf8' });
  return { status: r.status, out: r.stdout + r.stderr };
}

const write = (offset: number, bytes: number, seed: number): Promise<unknown> =>
  cl.request('io', { op: 'write', name: 'vol', offset, data: pattern(bytes, seed).toString('base64') });

beforeAll(async () => {
  sb = sandbox();
  await ok(sb, ['daemon', '--http-listen', '127.0.0.1:0']);
  const rlog = image(sb, 'rlog', (RING + 64) * 512);
  const local = image(sb, 'local.img', SECTORS * 512);
  const remote = image(sb, 'remote.img', SECTORS * 512);
  const dlog = image(sb, 'dlog', 64 * 512);
  await ok(sb, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${rlog} 0 auto ${RING} blockdev 1 0 blockdev 3 1 async retest=1`]);
  await ok(sb, ['create', 'vol', '--table', `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${local} nolog 0 1 1 ${remote} disk 3 ${dlog} ${REGION} nosync`]);
  cl = await client(sb);
  const hello = (await cl.request('hello', {})) as { httpTcp: { host: string; port: number } | null };
  expect(hello.httpTcp?.host).toBe('127.0.0.1');
  base = `http://127.0.0.1:${hello.httpTcp!.port}`;
}, 60_000);

afterAll(async () => {
  prom?.kill('SIGKILL');
  cl?.close();
  await cleanup(sb);
});

describe('metrics', () => {
  it('promtool check metrics passes on scrapes taken while a writer replicates', async () => {
    let stop = false;
    const writer = (async () => {
      for (let i = 0; !stop; i++) await write(((i * 8) % SECTORS) * 512, 4096, i);
    })();
    try {
      for (let n = 0; n < 5; n++) {
        const text = await scrape();
        const r = promtoolCheck(text);
        expect(r.out).toBe('');
        expect(r.status).toBe(0);
        expect(text).toMatch(/^dmkit_replication_site_lag_ios\{device="repl",slink="1",type="blockdev"\} \d+$/m);
        expect(text).toMatch(/^process_resident_memory_bytes \d+/m);
      }
    } finally {
      stop = true;
      await writer;
    }
  }, 60_000);

  it('counts a known set of writes and their bytes, in the histogram too', async () => {
    const before = await scrape();
    const w = { device: 'vol', op: 'write' };
    const count0 = sample(before, 'dmkit_device_io_total', w);
    const bytes0 = sample(before, 'dmkit_device_io_bytes_total', w);
    for (let i = 0; i < 10; i++) await write(i * 8192, 8192, 100 + i);
    const after = await scrape();
    expect(sample(after, 'dmkit_device_io_total', w) - count0).toBe(10);
    expect(sample(after, 'dmkit_device_io_bytes_total', w) - bytes0).toBe(10 * 8192);
    expect(sample(after, 'dmkit_device_io_duration_seconds_count', w)).toBe(sample(after, 'dmkit_device_io_total', w));
    expect(sample(after, 'dmkit_device_io_duration_seconds_bucket', { ...w, le: '+Inf' })).toBe(sample(after, 'dmkit_device_io_total', w));
    expect(sample(after, 'dmkit_device_size_bytes', { device: 'vol' })).toBe(SECTORS * 512);
    expect(sample(after, 'dmkit_replication_primary', { device: 'repl' })).toBe(1);
    expect(sample(after, 'dmkit_replication_split_brain', { device: 'repl' })).toBe(0);
  });

  it('shows a suspended site: its state and its lag in ios and bytes; caught up, lag 0 and no region out of sync', async () => {
    await ok(sb, ['message', 'repl', '0', 'slink', 'suspend', '1']);
    const s = { device: 'repl', slink: '1', type: 'blockdev' };
    const before = await scrape();
    expect(sample(before, 'dmkit_replication_site_state', { ...s, state: 'suspended' })).toBe(1);
    expect(sample(before, 'dmkit_replication_site_state', { ...s, state: 'asynchronous' })).toBe(0);
    expect(sample(before, 'dmkit_replication_site_up', s)).toBe(0);
    const lag0 = sample(before, 'dmkit_replication_site_lag_ios', s);
    const bytes0 = sample(before, 'dmkit_replication_site_lag_bytes', s);
    // 7 writes in 7 distinct regions
    for (let i = 0; i < 7; i++) await write((100 + i) * REGION * 512, 4096, 200 + i);
    const during = await scrape();
    expect(sample(during, 'dmkit_replication_site_lag_ios', s) - lag0).toBe(7);
    expect(sample(during, 'dmkit_replication_site_lag_bytes', s) - bytes0).toBe(7 * 4096);
    expect(promtoolCheck(during).status).toBe(0);

    await ok(sb, ['message', 'repl', '0', 'slink', 'resume', '1']);
    for (let i = 0; ; i++) {
      const t = await scrape();
      if (sample(t, 'dmkit_replication_site_lag_ios', s) === 0 && sample(t, 'dmkit_replication_site_up', s) === 1) {
        expect(sample(t, 'dmkit_replication_site_state', { ...s, state: 'asynchronous' })).toBe(1);
        expect(sample(t, 'dmkit_replication_site_out_of_sync_regions', s)).toBe(0);
        expect(sample(t, 'dmkit_replication_site_regions', s)).toBe(SECTORS / REGION);
        break;
      }
      if (i > 300) throw new Error(`the site never caught up:\n${t.split('\n').filter((l) => l.includes('slink="1"')).join('\n')}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(fs.readFileSync(path.join(sb.dir, 'remote.img')).equals(fs.readFileSync(path.join(sb.dir, 'local.img')))).toBe(true);
  }, 60_000);

  it('a real Prometheus scrapes the daemon and PromQL returns the site\'s lag', async () => {
    const bin = tool('prometheus');
    const port = await freePort();
    const dir = path.join(sb.dir, 'prometheus');
    fs.mkdirSync(dir);
    const target = base.replace('http://', '');
    fs.writeFileSync(path.join(dir, 'prometheus.yml'), [
      'global:', '  scrape_interval: 1s', '  evaluation_interval: 1s',
      'rule_files:', `  - ${path.join(ROOT, 'contrib/prometheus/dmkit-alerts.yml')}`,
      'scrape_configs:', '  - job_name: dmkit', '    static_configs:', `      - targets: ['${target}']`, '',
    ].join('\n'));
    // the site suspended with 5 writes behind it: a lag Prometheus must report exactly
    await ok(sb, ['message', 'repl', '0', 'slink', 'suspend', '1']);
    for (let i = 0; i < 5; i++) await write((50 + i) * REGION * 512, 4096, 300 + i);
    prom = spawn(bin, [
      `--config.file=${path.join(dir, 'prometheus.yml')}`, `--storage.tsdb.path=${path.join(dir, 'data')}`,
      `--web.listen-address=127.0.0.1:${port}`, '--log.level=warn',
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
    let log = '';
    prom.stderr!.on('data', (d: Buffer) => (log += d.toString()));
    const query = `dmkit_replication_site_lag_ios{job="dmkit",device="repl",slink="1"}`;
    let result: Array<{ metric: Record<string, string>; value: [number, string] }> = [];
    for (let i = 0; result.length === 0; i++) {
      if (i > 600 || prom.exitCode !== null) throw new Error(`no answer from Prometheus for ${query}: ${log}`);
      await new Promise((r) => setTimeout(r, 100));
      try {
        const r = await fetch(`http://127.0.0.1:${port}/api/v1/query?query=${encodeURIComponent(query)}`);
        if (!r.ok) continue;
        result = ((await r.json()) as { data: { result: typeof result } }).data.result;
      } catch {
        // not listening yet
      }
    }
    expect(result).toHaveLength(1);
    expect(result[0]!.metric).toMatchObject({ device: 'repl', slink: '1', type: 'blockdev', instance: target });
    expect(Number(result[0]!.value[1])).toBe(5);
    const up = await fetch(`http://127.0.0.1:${port}/api/v1/query?query=${encodeURIComponent('up{job="dmkit"}')}`);
    expect(((await up.json()) as { data: { result: Array<{ value: [number, string] }> } }).data.result[0]!.value[1]).toBe('1');
    await ok(sb, ['message', 'repl', '0', 'slink', 'resume', '1']);
  }, 90_000);

  it('a tcp site shows its bytes on the wire both ways and its compression ratio', async () => {
    const b = await SiteDaemon.start();
    try {
      const remote = path.join(b.sb.dir, 'tvol.img');
      fs.writeFileSync(remote, Buffer.alloc(SECTORS * 512));
      await b.request('create', { name: 'tvol', table: `0 ${SECTORS} linear ${remote} 0` });
      const rlog = image(sb, 'trlog', (RING + 64) * 512);
      const local = image(sb, 'tlocal.img', SECTORS * 512);
      const words = ['1', 'async', 'retest=1', 'compress=lz4', `peer=${b.address}`, `secret=${b.secretFile}`];
      await ok(sb, ['create', 'trepl', '--table', `0 1 replicator ringbuffer 4 ${rlog} 0 auto ${RING} blockdev 1 0 tcp ${words.length} ${words.join(' ')}`]);
      await ok(sb, ['create', 'tvol', '--table', `0 ${SECTORS} replicator-dev dm:trepl 0 0 1 ${local} nolog 0 1 1 tvol core 2 ${REGION} nosync`]);
      // 64 writes of text that compresses well
      const text = Buffer.alloc(16384);
      for (let o = 0; o < text.length; o += 64) text.write(`line ${o >> 6} of a log-like block, dmkit metrics\n`.padEnd(64, '.'), o);
      for (let i = 0; i < 64; i++) await cl.request('io', { op: 'write', name: 'tvol', offset: i * 16384, data: text.toString('base64') });
      const s = { device: 'trepl', slink: '1', type: 'tcp' };
      let t = '';
      for (let i = 0; ; i++) {
        t = await scrape();
        if (sample(t, 'dmkit_replication_site_up', s) === 1 && sample(t, 'dmkit_replication_site_lag_ios', s) === 0) break;
        if (i > 300) throw new Error(`tcp site never caught up: ${t.split('\n').filter((l) => l.includes('trepl')).join('\n')}`);
        await new Promise((r) => setTimeout(r, 100));
      }
      const payload = sample(t, 'dmkit_replication_site_payload_bytes_total', s);
      const compressed = sample(t, 'dmkit_replication_site_compressed_bytes_total', s);
      const sent = sample(t, 'dmkit_replication_site_wire_bytes_total', { ...s, direction: 'sent' });
      const received = sample(t, 'dmkit_replication_site_wire_bytes_total', { ...s, direction: 'received' });
      expect(payload).toBe(64 * 16384);
      expect(compressed).toBeLessThan(payload / 4);
      expect(sent).toBeGreaterThan(compressed); // the frames: the compressed data and their headers
      expect(sent).toBeLessThan(payload / 2);
      expect(received).toBeGreaterThan(0); // replies
      expect(sample(t, 'dmkit_replication_site_compression_ratio', s)).toBe(Math.round((payload / compressed) * 100) / 100);
      expect(promtoolCheck(t).status).toBe(0);
      expect(fs.readFileSync(remote).equals(fs.readFileSync(local))).toBe(true);
      await ok(sb, ['remove', 'tvol']);
      await ok(sb, ['remove', 'trepl']);
      expect(await scrape()).not.toContain('trepl'); // a removed group is gone from the next scrape
    } finally {
      await b.close();
    }
  }, 90_000);

  it('the shipped alert rules pass promtool check rules and their unit tests', () => {
    const dir = path.join(ROOT, 'contrib', 'prometheus');
    const check = spawnSync(tool('promtool'), ['check', 'rules', 'dmkit-alerts.yml'], { cwd: dir, encoding: 'utf8' });
    expect(check.stdout + check.stderr).toContain('SUCCESS: 7 rules found');
    expect(check.status).toBe(0);
    const t = spawnSync(tool('promtool'), ['test', 'rules', 'dmkit-alerts.test.yml'], { cwd: dir, encoding: 'utf8' });
    expect(t.stdout + t.stderr).toContain('SUCCESS');
    expect(t.status).toBe(0);
  });
});

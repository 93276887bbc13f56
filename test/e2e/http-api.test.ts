/**
 * The HTTP listener refuses what it must, with the right status code, and changes nothing:
 * unknown paths and methods, headers too large, bodies too large or malformed, a daemon
 * without a token (read-only), a missing or wrong token; with the right token a change
 * goes through the same op as the CLI's. Also the listener's own start-up checks: a token
 * file others can read, a token without a listener, a bad address. The device's bytes and
 * the event counter are compared before and after every refused request.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ControlClient } from '../../src/daemon/client.ts';
import { cleanup, client, dmkit, image, ok, sandbox, type Sandbox } from '../helpers/daemon.ts';

const SECTORS = 2048;
const RING = 4096;

interface Site { device: string; base: string; sb: Sandbox; cl: ControlClient; local: string }
const sites: Site[] = [];

async function startSite(tokenFile?: string): Promise<Site> {
  const sb = sandbox();
  await ok(sb, ['daemon', '--http-listen', '127.0.0.1:0', ...(tokenFile ? ['--http-token', tokenFile] : [])]);
  const rlog = image(sb, 'rlog', (RING + 64) * 512);
  const local = image(sb, 'local.img', SECTORS * 512, (i) => (i * 13) & 0xff);
  const remote = image(sb, 'remote.img', SECTORS * 512, (i) => (i * 13) & 0xff);
  const dlog = image(sb, 'dlog', 64 * 512);
  await ok(sb, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${rlog} 0 auto ${RING} blockdev 1 0 blockdev 3 1 async retest=1`]);
  await ok(sb, ['create', 'vol', '--table', `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${local} nolog 0 1 1 ${remote} disk 3 ${dlog} 64 nosync`]);
  const cl = await client(sb);
  const h = (await cl.request('hello', {})) as { httpTcp: { port: number } };
  const site = { device: 'vol', base: `http://127.0.0.1:${h.httpTcp.port}`, sb, cl, local };
  sites.push(site);
  return site;
}

/** what a refused request must leave as it was */
async function fingerprint(s: Site): Promise<string> {
  const info = (await s.cl.request('info', { name: 'repl' })) as { eventNr: number; replication: { sites: Array<{ state: string }> } };
  const vol = (await s.cl.request('info', { name: 'vol' })) as { eventNr: number };
  const bytes = crypto.createHash('sha256').update(fs.readFileSync(s.local)).digest('hex');
  return JSON.stringify([info.eventNr, vol.eventNr, info.replication.sites.map((x) => x.state), bytes]);
}

/** send raw bytes to the listener and return the status line's code */
function raw(base: string, request: string): Promise<number> {
  const { hostname, port } = new URL(base);
  return new Promise((resolve, reject) => {
    const sock = net.connect(Number(port), hostname);
    let got = '';
    sock.on('data', (d) => {
      got += d.toString('latin1');
      const m = /^HTTP\/1\.1 (\d{3})/.exec(got);
      if (m) {
        sock.destroy();
        resolve(Number(m[1]));
      }
    });
    sock.on('error', reject);
    sock.on('close', () => reject(new Error(`closed without a status line: ${JSON.stringify(got.slice(0, 200))}`)));
    sock.write(request);
  });
}

let ro: Site;
let rw: Site;
let token: string;

beforeAll(async () => {
  ro = await startSite();
  const tokdir = fs.mkdtempSync(path.join(ro.sb.dir, 'tok-'));
  token = crypto.randomBytes(24).toString('hex');
  const tokenFile = path.join(tokdir, 'http-token');
  fs.writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
  rw = await startSite(tokenFile);
}, 60_000);

afterAll(async () => {
  for (const s of sites) {
    s.cl.close();
    await cleanup(s.sb);
  }
});

const suspend = JSON.stringify({ sector: 0, args: ['slink', 'suspend', '1'] });
const json = { 'content-type': 'application/json' };

describe('HTTP listener: bad input', () => {
  it('answers unknown paths and methods with 404, changing nothing', async () => {
    const before = await fingerprint(ro);
    for (const [method, p] of [['GET', '/nope'], ['GET', '/api/devices/vol/nope'], ['DELETE', '/api/devices/vol'], ['GET', '/../../etc/passwd'], ['GET', '/%2e%2e/%2e%2e/etc/passwd']]) {
      const r = await fetch(`${ro.base}${p}`, { method });
      // DELETE is a change: refused before routing on a read-only daemon
      expect([method, p, r.status]).toEqual([method, p, method === 'DELETE' ? 403 : 404]);
    }
    const r = await fetch(`${ro.base}/api/devices/nosuch`);
    expect(r.status).toBe(404);
    expect(((await r.json()) as { error: { code: string; message: string } }).error).toMatchObject({ code: 'ENXIO' });
    expect(await fingerprint(ro)).toBe(before);
  });

  it('answers headers too large with 431 and a malformed request line with 400', async () => {
    const before = await fingerprint(ro);
    expect(await raw(ro.base, `GET /api/status HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(64 * 1024)}\r\n\r\n`)).toBe(431);
    expect(await raw(ro.base, 'GARBAGE\r\n\r\n')).toBe(400);
    expect(await fingerprint(ro)).toBe(before);
    expect((await fetch(`${ro.base}/api/status`)).status).toBe(200); // still serving
  });

  it('is read-only without --http-token: a change gets 403, even with a token', async () => {
    const before = await fingerprint(ro);
    for (const headers of [json, { ...json, authorization: `Bearer ${token}` }]) {
      const r = await fetch(`${ro.base}/api/devices/repl/message`, { method: 'POST', headers, body: suspend });
      expect(r.status).toBe(403);
      expect(((await r.json()) as { error: { message: string } }).error.message).toContain('--http-token');
    }
    expect(await fingerprint(ro)).toBe(before);
  });

  it('with a token: a missing or wrong token gets 401 and changes nothing', async () => {
    const before = await fingerprint(rw);
    const cases: Array<Record<string, string>> = [json, { ...json, authorization: 'Bearer wrong-token-of-some-length' }, { ...json, authorization: `Basic ${token}` }, { ...json, authorization: `Bearer ${token}x` }];
    for (const headers of cases) {
      const r = await fetch(`${rw.base}/api/devices/repl/message`, { method: 'POST', headers, body: suspend });
      expect(r.status).toBe(401);
      expect(r.headers.get('www-authenticate')).toBe('Bearer realm="dmkit"');
    }
    expect(await fingerprint(rw)).toBe(before);
  });

  it('with the token: malformed, oversized or invalid bodies get 4xx and change nothing', async () => {
    const before = await fingerprint(rw);
    const auth = { ...json, authorization: `Bearer ${token}` };
    const post = (p: string, body: string, headers: Record<string, string> = auth): Promise<Response> =>
      fetch(`${rw.base}${p}`, { method: 'POST', headers, body });
    expect((await post('/api/devices/repl/message', '{"args": [')).status).toBe(400);
    expect((await post('/api/devices/repl/message', JSON.stringify({ args: ['x'.repeat(100 * 1024)] }))).status).toBe(413);
    expect((await post('/api/devices/repl/message', JSON.stringify({ args: [] }))).status).toBe(400);
    expect((await post('/api/devices/repl/message', JSON.stringify({ args: ['slink', 'suspend', '1'], evil: 1 }))).status).toBe(400);
    expect((await post('/api/devices/repl/message', JSON.stringify({ sector: -1, args: ['slink', 'suspend', '1'] }))).status).toBe(400);
    const bad = await post('/api/devices/repl/message', JSON.stringify({ args: ['slink', 'suspend', '9'] }));
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: { code: string; message: string } }).error).toMatchObject({ code: 'EINVAL' });
    expect((await post('/api/devices/nosuch/message', JSON.stringify({ args: ['x'] }))).status).toBe(404);
    expect((await post('/api/devices/repl/promote', JSON.stringify({ force: 'yes' }))).status).toBe(400);
    expect(await fingerprint(rw)).toBe(before);
  });

  it('with the token: a change goes through, as the CLI would do it', async () => {
    const auth = { ...json, authorization: `Bearer ${token}` };
    const r = await fetch(`${rw.base}/api/devices/repl/message`, { method: 'POST', headers: auth, body: suspend });
    expect(r.status).toBe(200);
    const st = (await rw.cl.request('info', { name: 'repl' })) as { replication: { sites: Array<{ slink: number; state: string }> } };
    expect(st.replication.sites.find((s) => s.slink === 1)!.state).toBe('suspended');
    // the engine's refusal comes back with its errno and message, as the CLI prints it
    const d = await fetch(`${rw.base}/api/devices/repl/demote`, { method: 'POST', headers: auth, body: '{}' });
    expect(d.status).toBe(400);
    expect(((await d.json()) as { error: { code: string; message: string } }).error).toEqual({
      code: 'EINVAL', message: 'repl: this daemon receives no replication (start it with --replication-listen and --replication-secret): a secondary would have nobody to take data from',
    });
    const back = await fetch(`${rw.base}/api/devices/repl/message`, { method: 'POST', headers: auth, body: JSON.stringify({ args: ['slink', 'resume', '1'] }) });
    expect(back.status).toBe(200);
    const again = (await rw.cl.request('info', { name: 'repl' })) as { replication: { role: string; sites: Array<{ slink: number; state: string }> } };
    expect(again.replication.sites.find((s) => s.slink === 1)!.state).toBe('asynchronous');
    expect(again.replication.role).toBe('primary');
  });
});

describe('HTTP listener: start-up checks', () => {
  it('refuses a token file others can read, a token without a listener, and a bad address', async () => {
    const sb = sandbox();
    try {
      const f = path.join(sb.dir, 'token');
      fs.writeFileSync(f, 'a-token-of-sufficient-length\n', { mode: 0o644 });
      fs.chmodSync(f, 0o644);
      const r1 = await dmkit(sb, ['daemon', '--foreground', '--http-listen', '127.0.0.1:0', '--http-token', f]);
      expect(r1.code).not.toBe(0);
      expect(r1.stderr).toContain(`HTTP token ${f}: mode 0644 lets others read it; chmod 600 it (refused)`);
      const r2 = await dmkit(sb, ['daemon', '--foreground', '--http-token', f]);
      expect(r2.code).not.toBe(0);
      expect(r2.stderr).toContain('--http-token needs --http-listen HOST:PORT');
      const r3 = await dmkit(sb, ['daemon', '--http-listen', 'localhost:99999']);
      expect(r3.code).not.toBe(0);
      expect(r3.stderr).toContain("--http-listen: expected HOST:PORT, [IPv6]:PORT or PORT (e.g. 127.0.0.1:10809), got 'localhost:99999'");
    } finally {
      await cleanup(sb);
    }
  }, 60_000);
});

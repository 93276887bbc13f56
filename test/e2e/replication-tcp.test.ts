/**
 * Replication over the `tcp` slink between two real daemons, driven through the `dmkit`
 * CLI and real NBD clients: site A (the sender: a replicator and replicator-devs) and site
 * B (`dmkit daemon --replication-listen … --replication-secret …`, the receiving devices).
 *
 *  - data written with nbdcopy at A reaches B byte for byte; B's device is secondary
 *    (`dmkit io write` there fails with EROFS, its NBD export is read-only, `info` says so)
 *    and A's `info` shows the link (connected, bytes on the wire);
 *  - compression: zstd and lz4 on compressible data show a ratio > 2 in `--json` status;
 *  - TLS: `tls=on` works; a receiver with `--replication-tls require` refuses a plain sender
 *    (auth-failed, the reason in status and in both logs) and nothing is written;
 *  - a wrong secret: refused before any data flows, `auth-failed` in status, both sides
 *    log it, B's image untouched;
 *  - secret files readable by others are refused, by the daemon and by the table.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, dmkit, ok, sandbox, signalDaemon, type Sandbox } from '../helpers/daemon.ts';
import { devUri } from '../helpers/daemon-nbd.ts';
import { ok as tool, requireTools, writeRandomImage } from '../helpers/nbd-tools.ts';
import { SiteDaemon, writeSecret } from '../helpers/site-daemon.ts';

const SECTORS = 16384; // 8 MiB per device
const BYTES = SECTORS * 512;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface SiteJson {
  slink: number; stateChar: string;
  lag: { ios: number };
  link: { connection: string; lastError: string | null; bytesOnWire: number; bytesReceived: number; payloadBytes: number; compressedBytes: number; compressionRatio: number | null; tls: boolean } | null;
}

let a: Sandbox;
let b: SiteDaemon;
const extra: SiteDaemon[] = [];

beforeAll(async () => {
  requireTools(['nbdcopy', 'nbdinfo', 'openssl']);
  b = await SiteDaemon.start();
});
afterAll(async () => {
  await b?.close();
  for (const s of extra) await s.close();
});
afterEach(async () => {
  if (a) await cleanup(a);
});

function blank(dir: string, name: string, bytes = BYTES): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, '');
  fs.truncateSync(f, bytes);
  return f;
}

interface Pem {
  pem: string;
  key: string;
}

function openssl(args: string[]): void {
  execFileSync('openssl', args, { stdio: 'ignore' });
}

/** a test CA: a self-signed P-256 certificate */
function makeCa(dir: string, name: string): Pem {
  const pem = path.join(dir, `${name}.pem`);
  const key = path.join(dir, `${name}.key`);
  openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', pem, '-days', '2', '-subj', `/CN=${name}`]);
  fs.chmodSync(key, 0o600);
  return { pem, key };
}

/** a certificate for `name` signed by `ca` */
function makeCert(dir: string, ca: Pem, name: string): Pem {
  const key = path.join(dir, `${name}.key`);
  const csr = path.join(dir, `${name}.csr`);
  const pem = path.join(dir, `${name}.pem`);
  openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${name}`]);
  openssl(['x509', '-req', '-in', csr, '-CA', ca.pem, '-CAkey', ca.key, '-CAcreateserial', '-out', pem, '-days', '2']);
  fs.chmodSync(key, 0o600);
  return { pem, key };
}

/** site A: a daemon with repl (tcp slink 1 to `site`) and vol over a local image, replicated to `remote` at the site */
async function siteA(site: SiteDaemon, remote: string, options: string[]): Promise<void> {
  a = sandbox();
  const words = ['1', 'async', 'retest=1', `peer=${site.address}`, `secret=${site.secretFile}`, ...options];
  await ok(a, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${blank(a.dir, 'rlog', 8 << 20)} 0 auto 16384 blockdev 1 0 tcp ${words.length} ${words.join(' ')}`]);
  await ok(a, ['create', 'vol', '--table', `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${blank(a.dir, 'local.img')} nolog 0 1 1 ${remote} core 2 64 nosync`]);
}

async function site1(): Promise<SiteJson> {
  const out = JSON.parse(await ok(a, ['status', '--json', 'repl'])) as Array<{ lines: Array<{ detail: { sites: SiteJson[] } }> }>;
  return out[0]!.lines[0]!.detail.sites.find((s) => s.slink === 1)!;
}

async function waitSite(cond: (s: SiteJson) => boolean, what: string, limitMs = 30_000): Promise<SiteJson> {
  for (const end = Date.now() + limitMs; ; await sleep(50)) {
    const s = await site1();
    if (cond(s)) return s;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(s)}`);
  }
}

async function receivingDevice(site: SiteDaemon, name: string): Promise<string> {
  const img = blank(site.sb.dir, `${name}.img`);
  await site.request('create', { name, table: `0 ${SECTORS} linear ${img} 0` });
  return img;
}

describe('two daemons over tcp', () => {
  it('nbdcopy at A reaches B byte for byte; B is secondary (EROFS, read-only export); info shows the link', async () => {
    const remoteImg = await receivingDevice(b, 'plain');
    await siteA(b, 'plain', []);
    const data = writeRandomImage(path.join(a.dir, 'data.img'), BYTES);
    await tool('nbdcopy', [path.join(a.dir, 'data.img'), devUri(a, 'vol')]);
    const s = await waitSite((x) => x.stateChar === 'A' && x.lag.ios === 0, 'caught up');
    expect(s.link?.connection).toBe('connected');
    expect(s.link!.bytesOnWire).toBeGreaterThanOrEqual(BYTES);
    expect(s.link!.payloadBytes).toBeGreaterThanOrEqual(BYTES);
    expect(s.link!.compressedBytes).toBe(s.link!.payloadBytes); // no compression
    expect(fs.readFileSync(remoteImg).equals(data)).toBe(true);
    expect(fs.readFileSync(path.join(a.dir, 'local.img')).equals(data)).toBe(true);

    // B: writes refused while it receives, reads fine, NBD export read-only, info names the role
    const w = await dmkit(b.sb, ['io', 'write', 'plain', '0', path.join(a.dir, 'data.img')]);
    expect(w.code).not.toBe(0);
    expect(w.stderr).toMatch(/EROFS|secondary/);
    expect(fs.readFileSync(remoteImg).equals(data)).toBe(true);
    const info = JSON.parse(await tool('nbdinfo', ['--json', devUri(b.sb, 'plain')])) as { exports: Array<{ is_read_only: boolean }> };
    expect(info.exports[0]!.is_read_only).toBe(true);
    expect(await ok(b.sb, ['info', 'plain'])).toMatch(/Role: +secondary, receiving replication stream [0-9a-f]{32}\.1/);
    expect(await ok(a, ['info', 'repl'])).toMatch(new RegExp(`Slink 1: +.*connected to ${b.address.replace(/\./g, '\\.')}, \\d+ bytes on the wire`));

    // removing A's replicator-dev closes the stream's device: B's device is writable again
    await ok(a, ['remove', 'vol']);
    await ok(b.sb, ['io', 'write', 'plain', '0', path.join(a.dir, 'data.img')]);
    expect(await ok(b.sb, ['info', 'plain'])).not.toMatch(/Role/);
  });

  it('the receiving role survives both daemons restarting: B refuses writers until A removes the volume', async () => {
    const img = await receivingDevice(b, 'kept');
    await siteA(b, 'kept', []);
    fs.writeFileSync(path.join(a.dir, 'one.img'), Buffer.alloc(1 << 20, 0x77));
    await ok(a, ['io', 'write', 'vol', '0', path.join(a.dir, 'one.img')]);
    await waitSite((x) => x.stateChar === 'A' && x.lag.ios === 0, 'caught up');
    const refused = async (): Promise<void> => {
      const w = await dmkit(b.sb, ['io', 'write', 'kept', '0', path.join(a.dir, 'one.img')]);
      expect(w.code).not.toBe(0);
      expect(w.stderr).toContain('kept: device is secondary');
    };
    // site A's daemon stops (SIGTERM): the volume stays replicated, B keeps the role
    await signalDaemon(a, 'SIGTERM');
    await refused();
    // B is SIGKILLed and restarts with no sender connected: secondary again before anyone writes
    await b.kill();
    await b.restart();
    await refused();
    expect(fs.readFileSync(img).subarray(0, 1 << 20).equals(Buffer.alloc(1 << 20, 0x77))).toBe(true);
    // A comes back (its daemon restores the group), then removes the volume: B is writable again
    await ok(a, ['ls']);
    await waitSite((x) => x.link?.connection === 'connected', 'reconnected after both restarts');
    await ok(a, ['remove', 'vol']);
    await ok(b.sb, ['io', 'write', 'kept', '0', path.join(a.dir, 'one.img')]);
  });

  for (const codec of ['zstd', 'lz4'] as const) {
    it(`compress=${codec}: compressible data crosses with a ratio above 2, byte for byte`, async () => {
      const remoteImg = await receivingDevice(b, `c-${codec}`);
      await siteA(b, `c-${codec}`, [`compress=${codec}`]);
      const data = Buffer.alloc(BYTES);
      for (let o = 0; o < BYTES; o += 64) data.write(`block ${o >> 12} line ${(o >> 6) & 63} dmkit replication\n`.padEnd(64, '.'), o);
      fs.writeFileSync(path.join(a.dir, 'text.img'), data);
      await tool('nbdcopy', [path.join(a.dir, 'text.img'), devUri(a, 'vol')]);
      const s = await waitSite((x) => x.stateChar === 'A' && x.lag.ios === 0, 'caught up');
      expect(s.link!.compressionRatio).toBeGreaterThan(2);
      expect(s.link!.payloadBytes).toBeGreaterThan(s.link!.compressedBytes * 2);
      expect(s.link!.compressionRatio).toBe(Math.round((s.link!.payloadBytes / s.link!.compressedBytes) * 100) / 100);
      // the frames carry the compressed data and their headers; replies come back
      expect(s.link!.bytesOnWire).toBeGreaterThan(s.link!.compressedBytes);
      expect(s.link!.bytesReceived).toBeGreaterThan(0);
      expect(fs.readFileSync(remoteImg).equals(data)).toBe(true);
    });
  }

  it('tls=on crosses over TLS; a receiver requiring TLS refuses a plain sender, and nothing is written', async () => {
    const strict = await SiteDaemon.start({ args: ['--replication-tls', 'require'] });
    extra.push(strict);
    const img = await receivingDevice(strict, 'tls');
    await siteA(strict, 'tls', ['tls=on']);
    const data = writeRandomImage(path.join(a.dir, 'data.img'), 1 << 20);
    await tool('nbdcopy', [path.join(a.dir, 'data.img'), devUri(a, 'vol')]);
    const s = await waitSite((x) => x.stateChar === 'A' && x.lag.ios === 0, 'caught up over TLS');
    expect(s.link!.tls).toBe(true);
    expect(fs.readFileSync(img).subarray(0, 1 << 20).equals(data)).toBe(true);
    await cleanup(a);

    const img2 = await receivingDevice(strict, 'plain-refused');
    await siteA(strict, 'plain-refused', []);
    const r = await waitSite((x) => x.link?.connection === 'auth-failed', 'auth-failed');
    expect(r.link!.lastError).toMatch(/requires TLS/);
    expect(strict.log()).toMatch(/refused .*requires TLS/);
    expect(fs.readFileSync(img2).equals(Buffer.alloc(BYTES))).toBe(true);
  });

  it('TLS with certificates: both sides verify a chain to the CA; a sender signed by another CA is refused, nothing written', async () => {
    const dir = fs.mkdtempSync(path.join(b.sb.dir, 'pki-'));
    const ca = makeCa(dir, 'ca');
    const other = makeCa(dir, 'other-ca');
    const siteB = makeCert(dir, ca, 'siteb');
    const certA = makeCert(dir, ca, 'sitea');
    const rogue = makeCert(dir, other, 'rogue');
    const pki = await SiteDaemon.start({ args: ['--replication-tls-ca', ca.pem, '--replication-tls-cert', siteB.pem, '--replication-tls-key', siteB.key] });
    extra.push(pki);
    const img = await receivingDevice(pki, 'certs');
    await siteA(pki, 'certs', ['tls=on', `tls-ca=${ca.pem}`, `tls-cert=${certA.pem}`, `tls-key=${certA.key}`]);
    const data = writeRandomImage(path.join(a.dir, 'data.img'), 1 << 20);
    await tool('nbdcopy', [path.join(a.dir, 'data.img'), devUri(a, 'vol')]);
    const s = await waitSite((x) => x.stateChar === 'A' && x.lag.ios === 0, 'caught up over TLS with certificates');
    expect(s.link).toMatchObject({ connection: 'connected', tls: true, tlsMode: 'certificates' });
    expect(fs.readFileSync(img).subarray(0, 1 << 20).equals(data)).toBe(true);
    await cleanup(a);

    const img2 = await receivingDevice(pki, 'rogue');
    await siteA(pki, 'rogue', ['tls=on', `tls-ca=${ca.pem}`, `tls-cert=${rogue.pem}`, `tls-key=${rogue.key}`]);
    const r = await waitSite((x) => x.link?.connection === 'auth-failed' || x.link?.connection === 'down', 'refused');
    expect(r.link!.lastError).toMatch(/TLS|certificate|connection closed/i);
    expect(pki.log()).toMatch(/refused .*TLS handshake failed/);
    expect(fs.readFileSync(img2).equals(Buffer.alloc(BYTES))).toBe(true);
    // half a set of certificate options, or a key others may read, is refused with the reason
    const half = await dmkit(a, ['create', 'half', '--table', `0 1 replicator ringbuffer 4 ${blank(a.dir, 'rlog2', 8 << 20)} 0 auto 16384 blockdev 1 0 tcp 5 1 peer=${pki.address} secret=${pki.secretFile} tls=on tls-ca=${ca.pem}`]);
    expect(half.stderr).toContain('slink 1: TLS with certificates needs tls-ca=, tls-cert= and tls-key= together');
    fs.chmodSync(certA.key, 0o644);
    const loose = await dmkit(a, ['create', 'loose', '--table', `0 1 replicator ringbuffer 4 ${blank(a.dir, 'rlog3', 8 << 20)} 0 auto 16384 blockdev 1 0 tcp 7 1 peer=${pki.address} secret=${pki.secretFile} tls=on tls-ca=${ca.pem} tls-cert=${certA.pem} tls-key=${certA.key}`]);
    expect(loose.stderr).toContain(`slink 1: the TLS key ${certA.key} has mode 0644, others may read it; chmod 600 it`);
  });

  it('a wrong secret is refused before any data flows: auth-failed in status, logged on both sides, image untouched', async () => {
    const img = await receivingDevice(b, 'guarded');
    a = sandbox();
    const wrong = writeSecret(a.dir, 'wrong.key');
    const words = ['1', 'async', 'retest=1', `peer=${b.address}`, `secret=${wrong}`];
    await ok(a, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${blank(a.dir, 'rlog', 8 << 20)} 0 auto 16384 blockdev 1 0 tcp ${words.length} ${words.join(' ')}`]);
    await ok(a, ['create', 'vol', '--table', `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${blank(a.dir, 'local.img')} nolog 0 1 1 guarded core 2 64 nosync`]);
    fs.writeFileSync(path.join(a.dir, 'one.img'), Buffer.alloc(1 << 20, 0x5a));
    await ok(a, ['io', 'write', 'vol', '0', path.join(a.dir, 'one.img')]);
    const s = await waitSite((x) => x.link?.connection === 'auth-failed' && x.stateChar === 'D', 'auth-failed, site down');
    expect(s.link!.lastError).toMatch(/authentication failed/);
    expect(await ok(a, ['info', 'repl'])).toMatch(/Slink 1: +down, auth-failed to 127\.0\.0\.1:\d+/);
    expect(b.log()).toMatch(/refused 127\.0\.0\.1:\d+: .*authentication failed: the sender holds a different secret/);
    expect(fs.readFileSync(path.join(a.runtimeDir, 'daemon.log'), 'utf8')).toMatch(/authentication failed: the receiver's proof does not match our secret|the sender does not know our secret/);
    expect(fs.readFileSync(img).equals(Buffer.alloc(BYTES))).toBe(true);
    // the local write was acknowledged and kept for the site
    expect(fs.readFileSync(path.join(a.dir, 'local.img')).subarray(0, 1 << 20).equals(Buffer.alloc(1 << 20, 0x5a))).toBe(true);
  });

  it('secret files others may read are refused: by the daemon at start, and by a tcp slink table', async () => {
    a = sandbox();
    const loose = path.join(a.dir, 'loose.key');
    fs.writeFileSync(loose, 'a secret of more than sixteen bytes\n', { mode: 0o644 });
    fs.chmodSync(loose, 0o644);
    const d = await dmkit(a, ['daemon', '--foreground', '--replication-listen', '127.0.0.1:0', '--replication-secret', loose]);
    expect(d.code).not.toBe(0);
    expect(d.stderr).toContain(`replication secret ${loose}: mode 0644 lets others read it; chmod 600 it`);
    const missing = await dmkit(a, ['daemon', '--foreground', '--replication-listen', '127.0.0.1:0']);
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toContain('--replication-listen needs --replication-secret FILE');
    const t = await dmkit(a, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${blank(a.dir, 'rlog', 8 << 20)} 0 auto 16384 blockdev 1 0 tcp 4 1 async peer=${b.address} secret=${loose}`]);
    expect(t.code).not.toBe(0);
    expect(t.stderr).toContain(`slink 1: replication secret ${loose}: mode 0644 lets others read it; chmod 600 it`);
  });
});

/**
 * The status page (src/http/page/, docs/web.md) in a real headless Chromium, against a real
 * daemon started with `--http-listen 127.0.0.1:0`: a replication group (replicator +
 * replicator-dev, slink 1 a blockdev slink to an image file) is shown with its site's state;
 * the slink is suspended and the device written past the replication log's size, so the
 * site goes to its dirty log, and the page follows — suspended, not consistent, dirty cells in
 * the heat map equal to the daemon's — without a reload; the slink is resumed, the page shows
 * the resync's progress bar and then the site asynchronous and in sync again. Last the
 * daemon stops and starts again on the same port: the page says the connection was lost,
 * then restored. Screenshot: test-artifacts/web-status.png (during the resync).
 *
 * Chromium is Debian's /usr/bin/chromium (DMKIT_CHROMIUM names another): missing, the test
 * fails, it does not skip.
 */
import fs from 'node:fs';
import path from 'node:path';
import { chromium, type Browser, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ControlClient } from '../../src/daemon/client.ts';
import type { HelloResult } from '../../src/daemon/protocol.ts';
import { cleanup, client, image, ok, ROOT, sandbox, signalDaemon, type Sandbox } from '../helpers/daemon.ts';

const CHROMIUM = process.env.DMKIT_CHROMIUM ?? '/usr/bin/chromium';
const ARTIFACTS = path.join(ROOT, 'test-artifacts');
const SECTORS = 16384; // 8 MiB
const REGION = 64; // 32 KiB regions: 256 of them, one per heat map cell
const RING = 4096; // the smallest replication log, 2 MiB: overflows after 2 MiB of writes while the site is away
const WAIT = { timeout: 20_000 };
const TOKEN = 'web-page-test-token-0123456789abcdef';

let sb: Sandbox;
let cl: ControlClient | null = null;
let browser: Browser | null = null;
let page: Page;
let base: string;
let port: number;
let TOKEN_FILE: string;
let navigations = 0;
const pageErrors: string[] = [];

async function hello(): Promise<HelloResult> {
  return (await cl!.request('hello', {})) as HelloResult;
}

/** the site row's attributes */
async function site(sel = '[data-site="repl/1"]'): Promise<Record<string, string | null>> {
  return page.$eval(sel, (el) => Object.fromEntries(['data-state', 'data-mode', 'data-consistent', 'data-connection'].map((a) => [a, el.getAttribute(a)])));
}

async function heatApi(): Promise<{ outOfSync: number; cells: number[] }> {
  const res = await fetch(`${base}api/devices/repl/heatmap?cells=256`);
  expect(res.status).toBe(200);
  const body = (await res.json()) as { devices: Array<{ device: string; sites: Array<{ slink: number; outOfSync: number; cells: number[] }> }> };
  const s = body.devices.find((d) => d.device === 'vol')!.sites.find((x) => x.slink === 1)!;
  return { outOfSync: s.outOfSync, cells: s.cells };
}

beforeAll(async () => {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`web-page test: no Chromium at ${CHROMIUM}. Install Debian's chromium (apt-get install chromium) or set DMKIT_CHROMIUM to a Chromium binary; this test does not skip.`);
  }
  sb = sandbox();
  TOKEN_FILE = path.join(sb.dir, 'http.token');
  await ok(sb, ['daemon', '--http-listen', '127.0.0.1:0']);
  const rlog = image(sb, 'rlog', (RING + 64) * 512);
  const local = image(sb, 'local.img', SECTORS * 512, (i) => (i * 7) & 0xff);
  const remote = image(sb, 'remote.img', SECTORS * 512, (i) => (i * 7) & 0xff); // equal: nosync below is true
  const dlog = image(sb, 'dlog', 64 * 512);
  await ok(sb, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${rlog} 0 auto ${RING} blockdev 1 0 blockdev 3 1 async retest=1`]);
  await ok(sb, ['create', 'vol', '--table', `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${local} nolog 0 1 1 ${remote} disk 3 ${dlog} ${REGION} nosync`]);
  cl = await client(sb);
  const h = await hello();
  expect(h.httpTcp, 'hello names the HTTP listener').toBeTruthy();
  port = h.httpTcp!.port;
  base = `http://127.0.0.1:${port}/`;

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  page.on('framenavigated', (f) => {
    if (f === page.mainFrame()) navigations++;
  });
  page.on('pageerror', (e) => pageErrors.push(`pageerror: ${e.message}`));
  page.on('console', (m) => {
    // a refused connection while the daemon restarts is expected; anything else is not
    if (m.type() === 'error' && !/ERR_CONNECTION_REFUSED|Failed to load resource/.test(m.text())) pageErrors.push(`console: ${m.text()}`);
  });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
}, 60_000);

afterAll(async () => {
  await browser?.close();
  cl?.close();
  if (sb) await cleanup(sb);
});

describe('status page', () => {
  it('shows the group, its site, the heat map and the device stack', async () => {
    const res = await page.goto(base);
    expect(res!.status()).toBe(200);
    expect(res!.headers()['content-security-policy']).toContain("default-src 'self'");
    await page.evaluate(() => {
      (window as unknown as { __marker: number }).__marker = 1;
    });
    await page.waitForSelector('#conn[data-state="live"]', WAIT);
    await page.waitForSelector('[data-group="repl"][data-role="primary"][data-split-brain="false"]', WAIT);
    await page.waitForSelector('[data-site="repl/1"][data-state="asynchronous"]', WAIT);
    expect(await site()).toEqual({ 'data-state': 'asynchronous', 'data-mode': 'in-order', 'data-consistent': 'true', 'data-connection': 'attached' });
    // only remote sites have rows
    expect(await page.locator('[data-site]').count()).toBe(1);

    await page.waitForSelector('[data-heat="vol/1"]', WAIT);
    expect(await page.getAttribute('[data-heat="vol/1"]', 'data-out-of-sync')).toBe('0');
    expect(await page.getAttribute('[data-heat="vol/1"]', 'data-regions')).toBe(String(SECTORS / REGION));
    expect(await page.locator('[data-heat="vol/1"] [data-cell]').count()).toBe(SECTORS / REGION);
    expect(await page.locator('[data-heat="vol/1"] [data-dirty]').count()).toBe(0);

    // the stack: vol on top, repl below it, the image files as leaves
    expect(await page.getAttribute('[data-device="vol"]', 'data-depth')).toBe('0');
    expect(await page.getAttribute('[data-device="repl"]', 'data-depth')).toBe('1');
    expect(await page.getAttribute('[data-device="vol"]', 'data-state')).toBe('active');
    expect(await page.getAttribute('[data-device="vol"]', 'data-role')).toBe('primary');
    const rows = await page.$$eval('#devices tbody tr', (trs) => trs.map((tr) => tr.getAttribute('data-device') ?? tr.getAttribute('data-file')));
    expect(rows[0]).toBe('vol');
    expect(rows[1]).toBe('repl');
    expect(rows).toContain(path.join(sb.dir, 'remote.img'));
    expect(rows).toContain(path.join(sb.dir, 'rlog'));
    expect(await page.textContent('[data-device="vol"]')).toContain('8.0 MiB');
  });

  it('follows a suspended slink and writes that overflow the log into the dirty log, without a reload', async () => {
    await ok(sb, ['message', 'repl', '0', 'slink', 'suspend', '1']);
    await page.waitForSelector('[data-site="repl/1"][data-state="suspended"]', WAIT);
    // the event is listed
    await page.waitForSelector('#events li[data-name="repl"][data-state="suspended"]', WAIT);

    // 48 writes of two regions each, every 5th region: 3 MiB through a 2 MiB log
    const writes = 48;
    const dirtied = 2 * writes;
    for (let i = 0; i < writes; i++) {
      const data = Buffer.alloc(2 * REGION * 512, i + 1).toString('base64');
      await cl!.request('io', { op: 'write', name: 'vol', offset: i * 5 * REGION * 512, data });
    }
    await page.waitForSelector(`[data-heat="vol/1"][data-out-of-sync="${dirtied}"]`, WAIT);
    expect(await page.locator('[data-heat="vol/1"] [data-dirty]').count()).toBe(dirtied);
    // the same cells as the daemon's heat map (nothing changes it while the site is suspended)
    const api = await heatApi();
    expect(api.outOfSync).toBe(dirtied);
    const dirtyCells = await page.$$eval('[data-heat="vol/1"] [data-dirty]', (els) => els.map((e) => Number(e.getAttribute('data-cell'))));
    expect(dirtyCells).toEqual(api.cells.flatMap((f, i) => (f > 0 ? [i] : [])));
    await page.waitForSelector('[data-site="repl/1"][data-mode="dirty-log"][data-consistent="false"]', WAIT);
    expect((await site())['data-state']).toBe('suspended');

    expect(await page.evaluate(() => (window as unknown as { __marker?: number }).__marker)).toBe(1);
    expect(navigations).toBe(1);
  });

  it('shows the resync with a progress bar after resume, then the site asynchronous and in sync', async () => {
    // paced, so that the resync is seen running: 3 MiB at 512 KiB/s
    await ok(sb, ['message', 'repl', '0', 'resync-rate', '512k']);
    await ok(sb, ['message', 'repl', '0', 'slink', 'resume', '1']);
    await page.waitForSelector('[data-site="repl/1"][data-state="resyncing"] progress[data-progress="repl/1"][data-work="resync"]', WAIT);
    const first = Number(await page.getAttribute('[data-progress="repl/1"]', 'data-done'));
    // the page polls while the resync runs: the bar moves without events
    await page.waitForFunction((f) => {
      const el = document.querySelector('[data-site="repl/1"][data-state="resyncing"] [data-progress="repl/1"]');
      return el !== null && Number(el.getAttribute('data-done')) > f;
    }, first, WAIT);
    await page.screenshot({ path: path.join(ARTIFACTS, 'web-status.png'), fullPage: true });

    await page.waitForSelector('[data-site="repl/1"][data-state="asynchronous"][data-mode="in-order"][data-consistent="true"]', { timeout: 40_000 });
    await page.waitForSelector('[data-heat="vol/1"][data-out-of-sync="0"]', WAIT);
    expect(await page.locator('[data-heat="vol/1"] [data-dirty]').count()).toBe(0);
    expect(await page.locator('[data-progress="repl/1"]').count()).toBe(0);
    expect(fs.readFileSync(path.join(sb.dir, 'remote.img')).equals(fs.readFileSync(path.join(sb.dir, 'local.img')))).toBe(true);

    expect(await page.evaluate(() => (window as unknown as { __marker?: number }).__marker)).toBe(1);
    expect(navigations).toBe(1);
  }, 60_000);

  it('says when the connection to the daemon is lost and when it is back', async () => {
    expect(await page.isHidden('#auth'), 'read-only daemon: no token field').toBe(true);
    expect(await page.locator('button[data-action]').count()).toBe(0);
    cl?.close();
    cl = null;
    await signalDaemon(sb, 'SIGTERM');
    await page.waitForSelector('#conn[data-state="lost"]', WAIT);
    await page.waitForSelector('[data-alert="connection"]', WAIT);
    // the same port again, now with a token for changes; the devices come back from the saved state
    fs.writeFileSync(TOKEN_FILE, `${TOKEN}\n`, { mode: 0o600 });
    await ok(sb, ['daemon', '--http-listen', `127.0.0.1:${port}`, '--http-token', TOKEN_FILE]);
    await page.waitForSelector('#conn[data-state="live"][data-reconnects="1"]', WAIT);
    expect(await page.textContent('#conn')).toContain('restored');
    await page.waitForSelector('[data-site="repl/1"]', WAIT);
    expect(await page.locator('[data-alert="connection"]').count()).toBe(0);

    expect(await page.evaluate(() => (window as unknown as { __marker?: number }).__marker)).toBe(1);
    expect(navigations).toBe(1);
  }, 60_000);

  it('with --http-token: buttons that send the token, refused without the right one', async () => {
    await page.waitForSelector('#auth:not([hidden])', WAIT);
    await page.waitForSelector('[data-site="repl/1"][data-state="asynchronous"]', WAIT);
    const verify = '[data-site="repl/1"] button[data-action="verify"][data-target="repl/1"]';
    await page.click(verify);
    await page.waitForSelector('#action-result[data-result="error"]', WAIT);
    expect(await page.textContent('#action-result')).toContain('token');

    await page.fill('#token', 'not-the-token-at-all');
    await page.press('#token', 'Enter'); // must not submit the form (a navigation)
    await page.click(verify);
    await page.waitForFunction(() => /wrong token/.test(document.getElementById('action-result')?.textContent ?? ''), null, WAIT);

    await page.fill('#token', TOKEN);
    await page.click(verify);
    await page.waitForFunction(() => /verify started/.test(document.getElementById('action-result')?.textContent ?? ''), null, WAIT);
    expect(await page.getAttribute('#action-result', 'data-result')).toBe('ok');
    await page.waitForFunction(() => /last verify: 0 of 256 region\(s\) differed/.test(document.querySelector('[data-site="repl/1"]')?.textContent ?? ''), null, WAIT);
    await page.waitForSelector('#events li[data-name="repl"]:has-text("verified")', WAIT);

    expect(await page.evaluate(() => (window as unknown as { __marker?: number }).__marker)).toBe(1);
    expect(navigations).toBe(1);
    expect(pageErrors).toEqual([]);
  }, 60_000);
});

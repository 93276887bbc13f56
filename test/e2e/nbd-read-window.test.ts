/**
 * The server's read window (src/nbd/transmission.ts): READs wait to start while the bytes of
 * READs running plus replies the socket has not taken reach the window, which grows with how
 * long a READ takes. A client that stops reading must hold back the READs it queued (instead
 * of the server filling buffers for all of them), a slow device must still get its READs run
 * side by side, and READs waiting for the window must neither be lost nor keep the export
 * open when the connection goes.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { ExportHandle, ExportInfo, ExportProvider } from '../../src/nbd/export.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import { TestProvider, serveAndOpen } from '../helpers/nbd-file-provider.ts';
import { CMD, RawNbd, readData, replyErrno } from '../helpers/nbd-raw-client.ts';
import { writeRandomImage } from '../helpers/nbd-tools.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const READ = 256 * KiB;

/**
 * The file export with its READs counted at the handle and served from the in-memory copy of
 * the image: they take microseconds even on a loaded machine, so the window stays at its
 * base (a READ through libuv's pool can take milliseconds there, and the window rightly
 * grows with that). `readDelayMs` makes it a slow device.
 */
class CountingProvider implements ExportProvider {
  readonly inner: TestProvider;
  readDelayMs = 0;
  started = 0;
  running = 0;
  maxRunning = 0;

  constructor(file: string) {
    this.inner = new TestProvider([{ kind: 'file', name: 'disk', path: file }]);
  }

  list(): ExportInfo[] {
    return this.inner.list();
  }

  info(name: string): ExportInfo | undefined {
    return this.inner.info(name);
  }

  open(name: string): ExportHandle {
    const h = this.inner.open(name);
    return {
      ...h,
      read: async (buf, offset) => {
        this.started++;
        this.maxRunning = Math.max(this.maxRunning, ++this.running);
        try {
          if (this.readDelayMs > 0) await new Promise((r) => setTimeout(r, this.readDelayMs));
          model.copy(buf, 0, offset, offset + buf.length);
        } finally {
          this.running--;
        }
      },
    };
  }
}

let dir: string;
let file: string;
let model: Buffer;
const servers: NbdServer[] = [];
const clients: RawNbd[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'dmkit-nbd-window-'));
  file = join(dir, 'disk.img');
  model = Buffer.from(writeRandomImage(file, SIZE));
});

afterAll(async () => {
  for (const c of clients) c.destroy();
  for (const s of servers) await s.close();
  rmSync(dir, { recursive: true, force: true });
});

async function setup(name: string): Promise<{ server: NbdServer; provider: CountingProvider; c: RawNbd }> {
  const provider = new CountingProvider(file);
  const server = new NbdServer(provider, { readWindowBytes: 128 * KiB });
  servers.push(server);
  const c = await serveAndOpen(server, join(dir, `${name}.sock`), 'disk');
  clients.push(c);
  return { server, provider, c };
}

/** `n` READs of 256 KiB at pseudo-random places, sent in one write */
function sendReads(c: RawNbd, n: number, seed: number): Map<bigint, number> {
  const reads = new Map<bigint, number>();
  const parts: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    const offset = ((seed * 7919 + i * 104729) % (SIZE / READ)) * READ;
    const q = c.encode(CMD.read, { offset, length: READ });
    parts.push(q.bytes);
    reads.set(q.cookie, offset);
  }
  c.write(Buffer.concat(parts));
  return reads;
}

async function expectData(c: RawNbd, reads: Map<bigint, number>): Promise<void> {
  const got = await c.collect([...reads.keys()]);
  for (const [cookie, offset] of reads) {
    const replies = got.get(cookie)!;
    expect(replyErrno(replies)).toBe(0);
    expect(readData(replies, offset, READ).equals(model.subarray(offset, offset + READ))).toBe(true);
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('NBD read window', { timeout: 60_000 }, () => {
  test('a client that stops reading holds back the READs it queued; they all run once it reads', async () => {
    const { provider, c } = await setup('stall');
    c.socket.pause();
    const reads = sendReads(c, 64, 1);
    await sleep(300);
    // without the window all 64 would have been read into buffers waiting for the socket;
    // with it, only what the socket's kernel buffers and the window hold (a few; the bound
    // leaves room for a preempted READ stretching the window on a loaded machine)
    expect(provider.started).toBeGreaterThan(0);
    expect(provider.started).toBeLessThanOrEqual(24);
    c.socket.resume();
    await expectData(c, reads);
    expect(provider.started).toBe(64);
  });

  test('a slow device still gets its READs run side by side', async () => {
    const { provider, c } = await setup('slow');
    provider.readDelayMs = 20;
    // the first READ runs alone and shows the device takes ~20 ms; the window then covers
    // what the socket could send meanwhile (80 MB at 4 GB/s), so the rest run together
    await expectData(c, sendReads(c, 32, 2));
    expect(provider.maxRunning).toBeGreaterThanOrEqual(16);
  });

  test('READs waiting for the window are dropped with the connection, and the export is closed', async () => {
    const { server, provider, c } = await setup('drop');
    c.socket.pause();
    sendReads(c, 64, 3);
    await sleep(200);
    expect(provider.started).toBeLessThan(64);
    expect(provider.inner.openHandles).toBe(1);
    c.destroy();
    for (let i = 0; i < 100 && provider.inner.openHandles > 0; i++) await sleep(20);
    expect(provider.inner.openHandles).toBe(0);
    expect(server.connections).toBe(0);
    // nothing more reached the device after the connection went
    const started = provider.started;
    await sleep(50);
    expect(provider.started).toBe(started);
  });
});

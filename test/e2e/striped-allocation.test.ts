/**
 * Allocation maps may be short: `striped` answers for at most 256 chunks per call, and the
 * caller asks again from where the answer ends. Through the library the pieces must add up
 * to the map of the sparse stripe files, and through the NBD server `nbdinfo --map` (which
 * follows short BLOCK_STATUS replies) must see data exactly where it was written, also far
 * beyond the first 256 chunks.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import { deviceExports } from '../../src/nbd/provider.ts';
import type { Extent } from '../../src/core/types.ts';
import { ok, requireTools, unixUri } from '../helpers/nbd-tools.ts';

const CHUNK = 8; // sectors: 4 KiB, one file-system block
const CHUNKS = 1024; // 2 stripes × 512 chunks: 4 MiB
const DATA_CHUNKS = [3, 300, 301, 700, 1023];

let dir: string;
let dm: DeviceMapper;
let server: NbdServer;
let sock: string;

/** the reference map, one entry per chunk, merged */
function expectedMap(): Extent[] {
  const out: Extent[] = [];
  for (let c = 0; c < CHUNKS; c++) {
    const state = DATA_CHUNKS.includes(c) ? 'data' : 'hole';
    const last = out[out.length - 1];
    if (last && last.state === state) last.sectors += CHUNK;
    else out.push({ sectors: CHUNK, state });
  }
  return out;
}

beforeAll(async () => {
  requireTools(['nbdinfo']);
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-striped-alloc-'));
  const files = [0, 1].map((i) => path.join(dir, `s${i}.img`));
  for (const f of files) {
    fs.writeFileSync(f, '');
    fs.truncateSync(f, (CHUNKS / 2) * CHUNK * 512);
  }
  for (const c of DATA_CHUNKS) {
    const fd = fs.openSync(files[c % 2]!, 'r+');
    fs.writeSync(fd, Buffer.alloc(CHUNK * 512, 0xab), 0, CHUNK * 512, Math.floor(c / 2) * CHUNK * 512);
    fs.closeSync(fd);
  }
  dm = new DeviceMapper();
  await dm.create('st', { table: `0 ${CHUNKS * CHUNK} striped 2 ${CHUNK} ${files[0]} 0 ${files[1]} 0` });
  server = new NbdServer(deviceExports(dm));
  sock = path.join(dir, 'nbd.sock');
  await server.listenUnix(sock);
});

afterAll(async () => {
  await server?.close();
  await dm?.close();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

it('answers for at most 256 chunks per call; asking again from there gives the whole map', async () => {
  const dev = dm.get('st');
  const first = await dev.allocation(0, CHUNKS * CHUNK);
  expect(first.reduce((a, e) => a + e.sectors, 0)).toBe(256 * CHUNK);
  const all: Extent[] = [];
  for (let s = 0; s < CHUNKS * CHUNK; ) {
    const part = await dev.allocation(s, CHUNKS * CHUNK - s);
    const n = part.reduce((a, e) => a + e.sectors, 0);
    expect(n).toBeGreaterThan(0);
    for (const e of part) {
      const last = all[all.length - 1];
      if (last && last.state === e.state) last.sectors += e.sectors;
      else all.push({ ...e });
    }
    s += n;
  }
  expect(all).toEqual(expectedMap());
});

it('nbdinfo --map follows the short replies and sees every data chunk', async () => {
  const out = await ok('nbdinfo', ['--map', '--json', unixUri(sock, 'st')]);
  const map = JSON.parse(out) as Array<{ offset: number; length: number; type: number }>;
  const data = map.filter((e) => (e.type & 1) === 0); // not a hole
  const dataChunks = data.flatMap((e) =>
    Array.from({ length: e.length / (CHUNK * 512) }, (_, k) => e.offset / (CHUNK * 512) + k));
  expect(dataChunks).toEqual(DATA_CHUNKS);
  expect(map.reduce((a, e) => a + e.length, 0)).toBe(CHUNKS * CHUNK * 512);
});

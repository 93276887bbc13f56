/**
 * Test fixture for the NBD protocol layer: an ExportProvider over real image files (node:fs
 * pread/pwrite/fdatasync; everything reported as data) and sparse in-memory exports
 * (unwritten 64 KiB chunks reported as holes). Not the engine: the daemon's provider over
 * the DeviceManager lives in src/nbd/provider.ts.
 *
 * Test hooks: `remove(name)` makes an export go away (handles get onGone), `hold(name)`
 * parks every new I/O on that export until the returned release function is called.
 */
import * as fs from 'node:fs';
import { BlockError, DmError } from '../../src/core/errors.ts';
import type { Extent } from '../../src/core/types.ts';
import type { ExportHandle, ExportInfo, ExportProvider } from '../../src/nbd/export.ts';
import type { NbdServer } from '../../src/nbd/server.ts';
import { RawNbd } from './nbd-raw-client.ts';

export type ExportSpec =
  | { kind: 'file'; name: string; path: string; readOnly?: boolean; description?: string }
  | { kind: 'memory'; name: string; size: number; readOnly?: boolean; description?: string };

interface Backend {
  read(buf: Buffer, offset: number): Promise<void>;
  write(buf: Buffer, offset: number): Promise<void>;
  sync(): Promise<void>;
  zero(offset: number, length: number, punch: boolean): Promise<void>;
  trim(offset: number, length: number): Promise<void>;
  allocation(offset: number, length: number): Extent[];
  close(): void;
}

const CHUNK = 64 * 1024;
const ZEROES = Buffer.alloc(1024 * 1024);

function fsCall<T>(fn: (cb: (err: NodeJS.ErrnoException | null, v: T) => void) => void): Promise<T> {
  return new Promise<T>((resolve, reject) => fn((err, v) => (err ? reject(err) : resolve(v))));
}

class FileBackend implements Backend {
  readonly #fd: number;
  constructor(path: string, readOnly: boolean) {
    this.#fd = fs.openSync(path, readOnly ? 'r' : 'r+');
  }
  async read(buf: Buffer, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const n = await fsCall<number>((cb) => fs.read(this.#fd, buf, done, buf.length - done, offset + done, cb));
      if (n === 0) {
        buf.fill(0, done);
        return;
      }
      done += n;
    }
  }
  async write(buf: Buffer, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      done += await fsCall<number>((cb) => fs.write(this.#fd, buf, done, buf.length - done, offset + done, cb));
    }
  }
  sync(): Promise<void> {
    return fsCall<void>((cb) => fs.fdatasync(this.#fd, (err) => cb(err, undefined)));
  }
  async zero(offset: number, length: number): Promise<void> {
    for (let p = 0; p < length; p += ZEROES.length) {
      await this.write(ZEROES.subarray(0, Math.min(ZEROES.length, length - p)), offset + p);
    }
  }
  async trim(): Promise<void> {
    // advisory: contents may stay as they are
  }
  allocation(_offset: number, length: number): Extent[] {
    return [{ sectors: Math.ceil(length / 512), state: 'data' }];
  }
  close(): void {
    fs.closeSync(this.#fd);
  }
}

/** sparse memory: chunks absent from the map are holes reading as zeroes */
export class MemoryBackend implements Backend {
  readonly chunks = new Map<number, Buffer>();
  async read(buf: Buffer, offset: number): Promise<void> {
    this.#each(offset, buf.length, (chunk, at, pos, n) => {
      if (chunk) chunk.copy(buf, pos, at, at + n);
      else buf.fill(0, pos, pos + n);
    });
  }
  async write(buf: Buffer, offset: number): Promise<void> {
    this.#each(offset, buf.length, (_c, at, pos, n, idx) => {
      let chunk = this.chunks.get(idx);
      if (!chunk) this.chunks.set(idx, (chunk = Buffer.alloc(CHUNK)));
      buf.copy(chunk, at, pos, pos + n);
    });
  }
  async sync(): Promise<void> {}
  async zero(offset: number, length: number, punch: boolean): Promise<void> {
    this.#each(offset, length, (chunk, at, _pos, n, idx) => {
      if (!chunk) return;
      if (punch && n === CHUNK) this.chunks.delete(idx);
      else chunk.fill(0, at, at + n);
    });
  }
  async trim(offset: number, length: number): Promise<void> {
    return this.zero(offset, length, true);
  }
  allocation(offset: number, length: number): Extent[] {
    const out: Extent[] = [];
    this.#each(offset, length, (chunk, _at, _pos, n) => {
      const state = chunk ? 'data' : 'hole';
      const last = out[out.length - 1];
      if (last && last.state === state) last.sectors += n / 512;
      else out.push({ sectors: n / 512, state });
    });
    return out;
  }
  close(): void {}
  #each(offset: number, length: number, fn: (c: Buffer | undefined, at: number, pos: number, n: number, idx: number) => void): void {
    for (let pos = 0; pos < length;) {
      const idx = Math.floor((offset + pos) / CHUNK);
      const at = (offset + pos) % CHUNK;
      const n = Math.min(CHUNK - at, length - pos);
      fn(this.chunks.get(idx), at, pos, n, idx);
      pos += n;
    }
  }
}

interface Entry {
  spec: ExportSpec;
  info: ExportInfo;
  memory?: MemoryBackend;
  handles: Set<{ gone: Array<() => void> }>;
  /** parked I/O while held: its length and how to let it go */
  held: Array<{ length: number; go: () => void }> | null;
}

export class TestProvider implements ExportProvider {
  readonly #exports = new Map<string, Entry>();
  /** handles opened and not yet closed, across all exports */
  openHandles = 0;

  constructor(specs: ExportSpec[]) {
    for (const spec of specs) {
      const size = spec.kind === 'file' ? fs.statSync(spec.path).size : spec.size;
      const info: ExportInfo = { name: spec.name, size, readOnly: spec.readOnly ?? false, description: spec.description };
      this.#exports.set(spec.name, {
        spec, info, handles: new Set(), held: null,
        memory: spec.kind === 'memory' ? new MemoryBackend() : undefined,
      });
    }
  }

  /** handles of export `name` opened and not yet closed */
  openCount(name: string): number {
    return this.#exports.get(name)?.handles.size ?? 0;
  }

  list(): ExportInfo[] {
    return [...this.#exports.values()].map((e) => e.info);
  }

  info(name: string): ExportInfo | undefined {
    return this.#exports.get(name)?.info;
  }

  /** the export goes away: every open handle's onGone fires */
  remove(name: string): void {
    const e = this.#exports.get(name);
    if (!e) return;
    this.#exports.delete(name);
    for (const h of e.handles) for (const cb of h.gone.splice(0)) cb();
  }

  /** park new I/O on `name` until the returned function is called */
  hold(name: string): () => void {
    const e = this.#exports.get(name)!;
    e.held = [];
    return () => {
      const q = e.held ?? [];
      e.held = null;
      for (const p of q) p.go();
    };
  }

  /** lengths of the I/O parked on `name` by hold(), in arrival order */
  parked(name: string): number[] {
    return (this.#exports.get(name)?.held ?? []).map((p) => p.length);
  }

  open(name: string): ExportHandle {
    const e = this.#exports.get(name);
    if (!e) throw new DmError('ENXIO', `no export ${name}`);
    const be: Backend = e.memory ?? new FileBackend((e.spec as { path: string }).path, e.info.readOnly);
    const state = { gone: [] as Array<() => void>, closed: false };
    e.handles.add(state);
    this.openHandles++;
    const gate = (length = 0): Promise<void> =>
      (e.held ? new Promise<void>((go) => e.held!.push({ length, go })) : Promise.resolve());
    const rw = (): void => {
      if (e.info.readOnly) throw new BlockError('EPERM', `${name} is read-only`);
    };
    return {
      info: e.info,
      read: async (buf, offset) => { await gate(buf.length); await be.read(buf, offset); },
      write: async (buf, offset, fua) => {
        await gate();
        rw();
        await be.write(buf, offset);
        if (fua) await be.sync();
      },
      flush: async () => { await gate(); await be.sync(); },
      trim: async (offset, length, fua) => {
        await gate();
        rw();
        await be.trim(offset, length);
        if (fua) await be.sync();
      },
      writeZeroes: async (offset, length, opts) => {
        await gate();
        rw();
        await be.zero(offset, length, !opts.noHole);
        if (opts.fua) await be.sync();
      },
      allocation: async (offset, length) => { await gate(); return be.allocation(offset, length); },
      close: () => {
        if (state.closed) throw new Error('handle closed twice');
        state.closed = true;
        e.handles.delete(state);
        this.openHandles--;
        if (!e.memory) be.close();
      },
      onGone: (cb) => { state.gone.push(cb); },
    };
  }
}

/** `server` listening on `sock`, and a raw client that has opened `name` with structured replies */
export async function serveAndOpen(server: NbdServer, sock: string, name: string): Promise<RawNbd> {
  await server.listenUnix(sock);
  const c = await RawNbd.connect(sock);
  await c.open(name, { sr: true });
  return c;
}

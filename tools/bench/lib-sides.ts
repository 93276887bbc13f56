/**
 * The two sides of a library benchmark as I/O factories for the pattern driver: dmkit (a
 * table in an in-process DeviceMapper, one bio per request through MappedDevice.submit) and
 * the plain-Node reference on a file (callbacks, one promise per request, or FileHandle).
 */
import fs from 'node:fs';
import { pathToFileURL } from 'node:url';
import type { MappedDevice } from '../../src/index.ts';
import type { Done, IoFactory, Pattern, SlotIo } from './workload.ts';

/** How the plain-Node reference issues a request. */
export type NodeApi = 'callback' | 'promise' | 'filehandle';

export type LibTarget =
  | { kind: 'dmkit'; table: string }
  | {
      kind: 'node';
      file: string;
      api: NodeApi;
      /** split reads larger than this into parallel pieces of this size (0: never) */
      readChunk: number;
    };

/**
 * A DeviceMapper with one device over `table`; the engine is left open (closing flushes).
 * `engine` may name another copy of src/index.ts (interleaved.ts compares two versions).
 */
export async function openDmkit(table: string, name = 'bench', engine?: string): Promise<MappedDevice> {
  const mod = (await import(engine ? pathToFileURL(engine).href : '../../src/index.ts')) as typeof import('../../src/index.ts');
  return new mod.DeviceMapper().create(name, { table });
}

/** one bio per request through MappedDevice.submit, the slot's buffer as payload */
export function dmkitFactory(dev: MappedDevice, p: Pattern): IoFactory {
  const op = p.op;
  const sectors = p.bs / 512;
  const flags = {};
  return (buf) => (pos, done) => {
    dev.submit({ op, sector: pos / 512, sectors, data: buf, flags }).then(done, done);
  };
}

function shortIo(n: number, want: number): Error {
  return new Error(`short I/O: ${n} of ${want} bytes`);
}

type FsCb = (err: NodeJS.ErrnoException | null, n: number) => void;

export async function nodeFactory(t: Extract<LibTarget, { kind: 'node' }>, p: Pattern): Promise<IoFactory> {
  const fd = fs.openSync(t.file, 'r+');
  const fh = t.api === 'filehandle' ? await fs.promises.open(t.file, 'r+') : null;
  const chunk = p.op === 'read' && t.readChunk > 0 && p.bs > t.readChunk ? t.readChunk : p.bs;
  const pieces = Math.ceil(p.bs / chunk);
  const call = (buf: Buffer, off: number, len: number, pos: number, cb: FsCb): void => {
    if (p.op === 'read') fs.read(fd, buf, off, len, pos, cb);
    else fs.write(fd, buf, off, len, pos, cb);
  };
  const promiseCall = (buf: Buffer, off: number, len: number, pos: number): Promise<number> => {
    if (fh) {
      return p.op === 'read'
        ? fh.read(buf, off, len, pos).then((r) => r.bytesRead)
        : fh.write(buf, off, len, pos).then((r) => r.bytesWritten);
    }
    return new Promise((resolve, reject) => call(buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
  };

  if (t.api === 'callback') {
    return (buf): SlotIo => {
      let done: Done = () => {};
      let left = 0;
      let total = 0;
      let failure: unknown;
      const cb: FsCb = (err, n) => {
        if (err) failure ??= err;
        else total += n;
        if (--left === 0) done(failure ?? (total === buf.length ? undefined : shortIo(total, buf.length)));
      };
      return (pos, d) => {
        done = d;
        left = pieces;
        total = 0;
        failure = undefined;
        for (let off = 0; off < buf.length; off += chunk) call(buf, off, Math.min(chunk, buf.length - off), pos + off, cb);
      };
    };
  }
  // promise / filehandle: one promise per request (or Promise.all over the pieces)
  return (buf): SlotIo => {
    let done: Done = () => {};
    const ok = (n: number | number[]): void => {
      const total = typeof n === 'number' ? n : n.reduce((a, b) => a + b, 0);
      done(total === buf.length ? undefined : shortIo(total, buf.length));
    };
    const fail = (err: unknown): void => done(err);
    return (pos, d) => {
      done = d;
      if (pieces === 1) {
        promiseCall(buf, 0, buf.length, pos).then(ok, fail);
        return;
      }
      const parts: Promise<number>[] = [];
      for (let off = 0; off < buf.length; off += chunk) parts.push(promiseCall(buf, off, Math.min(chunk, buf.length - off), pos + off));
      Promise.all(parts).then(ok, fail);
    };
  };
}

/**
 * Adapts the device manager to the NBD server's ExportProvider: every active mapped device
 * is an export named after it. An open export counts as an opener of the device, named
 * after its client (EBUSY on remove unless forced or deferred: exportedTo); removal ends
 * the export (ESHUTDOWN on the wire).
 */
import type { Bio } from '../core/bio.ts';
import { EMPTY } from '../core/bio.ts';
import type { DeviceMapper } from '../core/device-manager.ts';
import { DeviceError } from '../core/errors.ts';
import type { Bypass, MappedDevice } from '../core/mapped-device.ts';
import type { Table } from '../core/table.ts';
import type { Extent } from '../core/types.ts';
import type { ExportBypass, ExportHandle, ExportInfo, ExportProvider, FileRange, NbdPeer } from './export.ts';
import { closeRanges } from './file-ranges.ts';

function infoOf(d: MappedDevice): ExportInfo {
  return { name: d.name, size: d.sectors * 512, readOnly: d.readOnly || d.secondary !== null, description: d.uuid || undefined };
}

/**
 * Who holds a device through NBD, as `dmkit remove` names that holder: the export name the
 * clients asked for and where they are, `exported over NBD as 'vol' to 127.0.0.1:41234`,
 * `… to a client on /run/dmkit/nbd.sock`. The connections under one export name make one
 * entry, counted, each TCP client by its address and the clients of a Unix socket together:
 * `… to 3 clients: 127.0.0.1:41234, 2 clients on /run/dmkit/nbd.sock`.
 */
function exportedTo(name: string, peers: readonly NbdPeer[]): string {
  const sockets = new Map<string, number>();
  for (const p of peers) if (p.kind === 'unix') sockets.set(p.path, (sockets.get(p.path) ?? 0) + 1);
  const parts = [
    ...peers.flatMap((p) => (p.kind === 'tcp' ? [p.host.includes(':') ? `[${p.host}]:${p.port}` : `${p.host}:${p.port}`] : [])),
    ...[...sockets].map(([path, n]) => `${n === 1 ? 'a client' : `${n} clients`} on ${path}`),
  ];
  return `exported over NBD as '${name}' to ${parts.length === 1 ? parts[0] : `${peers.length} clients: ${parts.join(', ')}`}`;
}

class DeviceExport implements ExportHandle {
  readonly #dev: MappedDevice;
  readonly #dm: DeviceMapper;
  /** the export name the client asked for */
  readonly #name: string;
  readonly #peer: NbdPeer;
  /** the provider's open exports (this one from open to close) */
  readonly #open: Set<DeviceExport>;
  /** this connection's opener of the device: its text covers every connection to the device by this name */
  readonly #holder = (): string => {
    const same = [...this.#open].filter((e) => e.#dev === this.#dev && e.#name === this.#name);
    return exportedTo(this.#name, same.map((e) => e.#peer));
  };
  #closed = false;
  #gone: Array<() => void> = [];
  readonly #onRemoved = (): void => {
    const cbs = this.#gone;
    this.#gone = [];
    for (const cb of cbs) cb();
  };

  constructor(dm: DeviceMapper, dev: MappedDevice, name: string, peer: NbdPeer, open: Set<DeviceExport>) {
    this.#dm = dm;
    this.#dev = dev;
    this.#name = name;
    this.#peer = peer;
    this.#open = open;
    dev.open(this.#holder);
    open.add(this);
    dev.once('removed', this.#onRemoved);
  }

  get info(): ExportInfo {
    return infoOf(this.#dev);
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.#dev.submit({ op: 'read', sector: offset / 512, sectors: buf.length / 512, data: buf, flags: {} });
  }

  write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    return this.#dev.submit({ op: 'write', sector: offset / 512, sectors: buf.length / 512, data: buf, flags: fua ? FUA : NOFLAGS });
  }

  flush(): Promise<void> {
    return this.#dev.submit(FLUSH);
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.#dev.submit({ op: 'discard', sector: offset / 512, sectors: length / 512, data: EMPTY, flags: fua ? FUA : NOFLAGS });
  }

  writeZeroes(offset: number, length: number, opts: { fua: boolean; noHole: boolean }): Promise<void> {
    const bio: Bio = { op: 'write-zeroes', sector: offset / 512, sectors: length / 512, data: EMPTY, flags: { fua: opts.fua, noUnmap: opts.noHole } };
    return this.#dev.submit(bio);
  }

  allocation(offset: number, length: number): Promise<Extent[]> {
    return this.#dev.allocation(offset / 512, Math.ceil(length / 512));
  }

  bypass(b: ExportBypass): { ranges: FileRange[] | null; detach(): void; ioSlab(writer: number): Float64Array } {
    const dev = this.#dev;
    const db: Bypass = { stop: () => b.stop(), start: (live) => b.start(fileRanges(live, dev.secondary !== null)) };
    dev.addBypass(db);
    return {
      ranges: dev.suspended ? null : fileRanges(dev.live, dev.secondary !== null),
      detach: () => dev.deleteBypass(db),
      ioSlab: (writer) => dev.ioSlab(writer),
    };
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#dev.off('removed', this.#onRemoved);
    this.#open.delete(this);
    if (this.#dev.close(this.#holder) && !this.#dev.removed) {
      // last opener of a device marked for deferred removal
      void this.#dm.remove(this.#dev.name).catch(() => undefined);
    }
  }

  onGone(cb: () => void): void {
    if (this.#dev.removed) cb();
    else this.#gone.push(cb);
  }
}

/** a table's file ranges in bytes, each with a descriptor of its own (other lines leave gaps); null if it has none */
function fileRanges(table: Table | null, secondary: boolean): FileRange[] | null {
  const spans = table?.fileMap();
  if (!spans) return null;
  const out: FileRange[] = [];
  let start = 0;
  try {
    for (const s of spans) {
      if (s.dev) {
        const { fd, state } = s.dev.share();
        out.push({
          start, length: s.sectors * 512, ref: s.dev.ref, path: s.dev.path, fd, state,
          offset: s.offset * 512, fileSectors: s.dev.sectors, readOnly: s.dev.readOnly || table!.readOnly || secondary,
        });
      }
      start += s.sectors * 512;
    }
  } catch {
    closeRanges(out); // a device closed under us: no ranges
    return null;
  }
  return out;
}

const FUA = Object.freeze({ fua: true });
const NOFLAGS = Object.freeze({});
const FLUSH: Bio = Object.freeze({ op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: NOFLAGS }) as Bio;

export function deviceExports(dm: DeviceMapper): ExportProvider {
  const active = (d: MappedDevice): boolean => !!d.live && !d.deferredRemove;
  const open = new Set<DeviceExport>();
  return {
    list: () => dm.list().filter(active).map(infoOf),
    info: (name) => {
      const d = dm.has(name) ? dm.get(name) : undefined;
      return d && active(d) ? infoOf(d) : undefined;
    },
    open: (name, peer) => {
      const d = dm.has(name) ? dm.get(name) : undefined;
      if (!d || !active(d)) throw new DeviceError('ENXIO', `${name}: no such active device`);
      return new DeviceExport(dm, d, name, peer, open);
    },
  };
}


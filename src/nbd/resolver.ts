/**
 * NBD exports as engine devices: `nbd://…`, `nbds://…`, `nbd+unix://…` and `nbds+unix://…`
 * references in tables open an NbdClient (client.ts) and present it as a BlockDev.
 *
 *   dm.addResolver(nbdResolver());
 *   0 131072 linear nbd+unix:///disk?socket=/run/nbd.sock 0
 *
 * The device's `ref` is the URI as given; its size is the export size in whole sectors;
 * `allocation` answers from BLOCK_STATUS `base:allocation` when the server negotiated it
 * (all data otherwise, or when a query fails: data is always a safe answer).
 */
import type { Bio } from '../core/bio.ts';
import { SECTOR_SIZE } from '../core/bio.ts';
import type { DeviceResolver } from '../core/device-manager.ts';
import { log } from '../core/log.ts';
import type { AllocState, BlockDev, Extent } from '../core/types.ts';
import { STATE_HOLE, STATE_ZERO } from './constants.ts';
import { NbdClient, type NbdClientOptions, type NbdExtent } from './client.ts';
import { isNbdUri } from './client-uri.ts';

/** an NBD export opened as a backing device */
export class NbdDev implements BlockDev {
  readonly ref: string;
  readonly sectors: number;
  readonly client: NbdClient;
  readonly #log = log('nbd-client');

  constructor(ref: string, client: NbdClient) {
    this.ref = ref;
    this.client = client;
    this.sectors = Math.floor(client.info.size / SECTOR_SIZE);
  }

  submit(bio: Bio): Promise<void> {
    if (bio.flags.preflush && bio.op !== 'flush') {
      return this.client.flush().then(() => this.#submit(bio));
    }
    return this.#submit(bio);
  }

  #submit(bio: Bio): Promise<void> {
    const c = this.client;
    const offset = bio.sector * SECTOR_SIZE;
    const fua = !!bio.flags.fua;
    switch (bio.op) {
      case 'read':
        return c.read(bio.data, offset);
      case 'write':
        return c.write(bio.data, offset, fua);
      case 'flush':
        return c.flush();
      case 'discard':
        return c.trim(offset, bio.sectors * SECTOR_SIZE, fua);
      case 'write-zeroes':
        return c.writeZeroes(offset, bio.sectors * SECTOR_SIZE, { fua, noHole: !!bio.flags.noUnmap });
    }
  }

  async allocation(sector: number, sectors: number): Promise<Extent[]> {
    if (!this.client.info.blockStatus) return [{ sectors, state: 'data' }];
    const map = new SectorMap();
    const end = (sector + sectors) * SECTOR_SIZE;
    let pos = sector * SECTOR_SIZE;
    while (pos < end) {
      let ext: NbdExtent[];
      try {
        ext = await this.client.blockStatus(pos, end - pos);
      } catch (err) {
        this.#log.limited(`bs:${this.ref}`, `${this.ref}: block status failed, reporting data: ${(err as Error).message}`);
        ext = [];
      }
      let got = 0;
      for (const e of ext) {
        if (e.length === 0 || pos + got >= end) break;
        const len = Math.min(e.length, end - pos - got);
        map.add(pos + got, len, stateOf(e.flags));
        got += len;
      }
      if (got === 0) {
        map.add(pos, end - pos, 'data');
        break;
      }
      pos += got;
      // continue at a sector boundary: the partial sector is already counted
      if (pos % SECTOR_SIZE !== 0 && pos < end) {
        const next = Math.min(end, (Math.floor(pos / SECTOR_SIZE) + 1) * SECTOR_SIZE);
        map.add(pos, next - pos, 'data');
        pos = next;
      }
    }
    return map.extents;
  }

  close(): Promise<void> {
    return this.client.close();
  }
}

function stateOf(flags: number): AllocState {
  if (flags & STATE_ZERO) return flags & STATE_HOLE ? 'hole' : 'zero';
  return 'data';
}

const RANK: Record<AllocState, number> = { hole: 0, zero: 1, data: 2 };

/**
 * Turns byte extents (in order, contiguous) into sector extents. A sector that straddles
 * two byte extents gets the "most allocated" of their states (data > zero > hole).
 */
class SectorMap {
  readonly extents: Extent[] = [];
  /** state of the partial sector in progress, if any */
  #partial: AllocState | null = null;

  add(offset: number, length: number, state: AllocState): void {
    let a = offset;
    const b = offset + length;
    if (a % SECTOR_SIZE !== 0) {
      const p = this.#partial;
      this.#partial = p === null || RANK[state] > RANK[p] ? state : p;
      const sectorEnd = (Math.floor(a / SECTOR_SIZE) + 1) * SECTOR_SIZE;
      if (b < sectorEnd) return;
      this.#emit(1, this.#partial);
      this.#partial = null;
      a = sectorEnd;
    }
    const full = Math.floor((b - a) / SECTOR_SIZE);
    if (full > 0) this.#emit(full, state);
    if (b % SECTOR_SIZE !== 0) this.#partial = state;
  }

  #emit(sectors: number, state: AllocState): void {
    const last = this.extents[this.extents.length - 1];
    if (last && last.state === state) last.sectors += sectors;
    else this.extents.push({ sectors, state });
  }
}

/**
 * The resolver to register with `dm.addResolver`. Every open makes its own connection;
 * the device manager shares one open per reference among tables.
 */
export function nbdResolver(options: NbdClientOptions = {}): DeviceResolver {
  return {
    matches: (ref: string) => isNbdUri(ref),
    async open(ref: string) {
      const client = await NbdClient.connect(ref, options);
      return new NbdDev(ref, client);
    },
  };
}

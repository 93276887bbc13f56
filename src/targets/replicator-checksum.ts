/**
 * Comparing a range of a device with its copy at a site by 4 KiB blocks (checksum resync
 * and verify, replicator-resync.ts). When the site's transport computes digests
 * (`RemoteDevice.digest`: tcp), the local blocks are read and hashed on the digest threads
 * (core/digest.ts) and compared with the site's digests; a tcp receiver without the 'digest'
 * feature (ENOTSUP) has its blocks read through `submit` and hashed here too. A site without
 * digests (blockdev, nbd) has its blocks read through `submit` and compared with the local
 * ones byte for byte: exact, and cheaper than hashing both (R4, docs/benchmarks.md).
 *
 * Blocks are 4 KiB (CHECKSUM_BLOCK_SECTORS): the size of a page and of most file-system
 * blocks, so a scattered small write costs one 4 KiB block to repair, not a 64 KiB one
 * (with 1 % of 4 KiB blocks differing at random, 64 KiB blocks would resend ~15 % of the
 * data). The digests cost 16 bytes per block, 0.4 % of the data compared.
 */
import type { CopyRange } from '../core/copy.ts';
import { DIGEST_BYTES, differingBlocks, differingData, digestFilled } from '../core/digest.ts';
import { BlockError } from '../core/errors.ts';
import type { BlockDev } from '../core/types.ts';
import type { RemoteDevice } from '../slink/types.ts';

/** the block of checksum resync and verify, in sectors (4 KiB) */
export const CHECKSUM_BLOCK_SECTORS = 8;

/** read `sectors` sectors from `sector` of `dev` and hash them here (into a buffer the digest thread shares) */
function readDigests(dev: BlockDev, sector: number, sectors: number): Promise<Buffer> {
  return digestFilled(sectors * 512, CHECKSUM_BLOCK_SECTORS * 512, (data) => dev.submit({ op: 'read', sector, sectors, data, flags: {} }));
}

/** the site's digests: computed there when it can (ENOTSUP: it cannot), else read and hashed here */
async function siteDigests(dev: RemoteDevice, sector: number, sectors: number): Promise<Buffer> {
  if (dev.digest) {
    try {
      return await dev.digest(sector, sectors, CHECKSUM_BLOCK_SECTORS);
    } catch (err) {
      if ((err as { code?: string }).code !== 'ENOTSUP') throw err;
    }
  }
  return readDigests(dev, sector, sectors);
}

/** the blocks of the range whose digests differ, local against the site's */
async function byDigests(local: BlockDev, remote: RemoteDevice, sector: number, sectors: number): Promise<number[]> {
  const [mine, theirs] = await Promise.all([readDigests(local, sector, sectors), siteDigests(remote, sector, sectors)]);
  if (mine.length !== theirs.length) throw new BlockError('EIO', `site answered ${theirs.length / DIGEST_BYTES} digests for ${mine.length / DIGEST_BYTES} blocks`);
  return differingBlocks(mine, theirs);
}

/** the blocks of the range that differ, both sides read here and compared byte for byte */
function byData(local: BlockDev, remote: RemoteDevice, sector: number, sectors: number): Promise<number[]> {
  const read = (dev: BlockDev) => (data: Buffer) => dev.submit({ op: 'read', sector, sectors, data, flags: {} });
  return differingData(sectors * 512, CHECKSUM_BLOCK_SECTORS * 512, read(local), read(remote));
}

/**
 * The runs of 4 KiB blocks of [sector, sector + sectors) that differ between `local` and
 * the site's `remote` (adjacent blocks merged; the last run ends at the range's end).
 * Rejects with the failed read's or digest's error.
 */
export async function differingRuns(local: BlockDev, remote: RemoteDevice, sector: number, sectors: number): Promise<CopyRange[]> {
  const runs: CopyRange[] = [];
  const end = sector + sectors;
  for (const block of remote.digest ? await byDigests(local, remote, sector, sectors) : await byData(local, remote, sector, sectors)) {
    const start = sector + block * CHECKSUM_BLOCK_SECTORS;
    const n = Math.min(CHECKSUM_BLOCK_SECTORS, end - start);
    const last = runs[runs.length - 1];
    if (last && last.sector + last.sectors === start) last.sectors += n;
    else runs.push({ sector: start, sectors: n });
  }
  return runs;
}

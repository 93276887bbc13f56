/** Pure pieces of the NBD server: errno mapping, flags, reply encoders, PSK files, buffer pool. */
import { describe, expect, test } from 'vitest';
import { BlockError } from '../../src/core/errors.ts';
import { BufferPool } from '../../src/nbd/buffer-pool.ts';
import * as C from '../../src/nbd/constants.ts';
import { blockStatusChunk, errorChunk, offsetDataHeader, simpleReply } from '../../src/nbd/replies.ts';
import { Req, checkRequest } from '../../src/nbd/requests.ts';
import { parsePskFile } from '../../src/nbd/tls.ts';

function extents(chunk: Buffer): number[] {
  const out: number[] = [];
  for (let p = C.CHUNK_HEADER_SIZE + 4; p < chunk.length; p += 4) out.push(chunk.readUInt32BE(p));
  return out;
}

describe('errno mapping', () => {
  test('errno names map to NBD wire values, unknown to EIO', () => {
    expect(C.errorToWire(new BlockError('EPERM'))).toBe(1);
    expect(C.errorToWire(new BlockError('EROFS'))).toBe(1);
    expect(C.errorToWire(new BlockError('EIO'))).toBe(5);
    expect(C.errorToWire(new BlockError('ENOMEM'))).toBe(12);
    expect(C.errorToWire(new BlockError('EINVAL'))).toBe(22);
    expect(C.errorToWire(new BlockError('ENOSPC'))).toBe(28);
    expect(C.errorToWire({ code: 'EDQUOT' })).toBe(28);
    expect(C.errorToWire({ code: 'EFBIG' })).toBe(28);
    expect(C.errorToWire(new BlockError('EOVERFLOW'))).toBe(75);
    expect(C.errorToWire(new BlockError('ENOTSUP'))).toBe(95);
    expect(C.errorToWire(new BlockError('ESHUTDOWN'))).toBe(108);
    expect(C.errorToWire(new BlockError('ETIMEDOUT'))).toBe(5);
    expect(C.errorToWire(new Error('plain'))).toBe(5);
    expect(C.errorToWire(undefined)).toBe(5);
    expect(C.errorToWire('EPERM')).toBe(5);
  });
});

describe('transmission flags', () => {
  test('SEND_DF only with structured replies, READ_ONLY when read-only', () => {
    expect(C.transmissionFlags(false, false)).toBe(0xd6d);
    expect(C.transmissionFlags(false, true)).toBe(0xded);
    expect(C.transmissionFlags(true, true)).toBe(0xdef);
  });

  test('command flags allowed per command', () => {
    expect(C.allowedCmdFlags(C.CMD_READ)).toBe(C.CMD_FLAG_FUA | C.CMD_FLAG_DF);
    expect(C.allowedCmdFlags(C.CMD_WRITE)).toBe(C.CMD_FLAG_FUA);
    expect(C.allowedCmdFlags(C.CMD_WRITE_ZEROES)).toBe(C.CMD_FLAG_FUA | C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FAST_ZERO);
    expect(C.allowedCmdFlags(C.CMD_BLOCK_STATUS)).toBe(C.CMD_FLAG_FUA | C.CMD_FLAG_REQ_ONE);
  });
});

describe('reply encoders', () => {
  test('simple reply and OFFSET_DATA header carry the cookie halves and a 64-bit offset', () => {
    const s = simpleReply(0x01020304, 0x05060708, 22);
    expect(s.toString('hex')).toBe('67446698' + '00000016' + '0102030405060708');
    const o = offsetDataHeader(1, 2, true, 2 ** 40 + 512, 4096);
    expect(o.readUInt32BE(0)).toBe(C.STRUCTURED_REPLY_MAGIC);
    expect(o.readUInt16BE(4)).toBe(C.REPLY_FLAG_DONE);
    expect(o.readUInt16BE(6)).toBe(C.CHUNK_OFFSET_DATA);
    expect(o.readUInt32BE(16)).toBe(8 + 4096);
    expect(o.readBigUInt64BE(20)).toBe(2n ** 40n + 512n);
  });

  test('error chunk truncates long messages', () => {
    const e = errorChunk(0, 7, 5, 'x'.repeat(10_000));
    expect(e.readUInt16BE(6)).toBe(C.CHUNK_ERROR);
    expect(e.readUInt32BE(20)).toBe(5);
    const msgLen = e.readUInt16BE(24);
    expect(msgLen).toBeLessThanOrEqual(256);
    expect(e.readUInt32BE(16)).toBe(6 + msgLen);
    expect(e.length).toBe(C.CHUNK_HEADER_SIZE + 6 + msgLen);
  });

  test('block status merges equal neighbours, clips to the request, maps states', () => {
    const c = blockStatusChunk(0, 1, [
      { sectors: 8, state: 'hole' }, { sectors: 8, state: 'hole' },
      { sectors: 4, state: 'zero' }, { sectors: 100, state: 'data' },
    ], 12 * 1024, false);
    expect(c.readUInt32BE(C.CHUNK_HEADER_SIZE)).toBe(C.META_BASE_ALLOCATION_ID);
    expect(extents(c)).toEqual([8192, 3, 2048, 2, 2048, 0]);
  });

  test('REQ_ONE returns exactly one extent no longer than the request', () => {
    const c = blockStatusChunk(0, 1, [{ sectors: 64, state: 'data' }, { sectors: 8, state: 'hole' }], 4096, true);
    expect(extents(c)).toEqual([4096, 0]);
    const d = blockStatusChunk(0, 1, [{ sectors: 1, state: 'zero' }, { sectors: 8, state: 'data' }], 65536, true);
    expect(extents(d)).toEqual([512, 2]);
  });

  test('an empty or degenerate answer becomes one data extent', () => {
    expect(extents(blockStatusChunk(0, 1, [], 65536, false))).toEqual([65536, 0]);
    expect(extents(blockStatusChunk(0, 1, [{ sectors: 0, state: 'hole' }], 512, false))).toEqual([512, 0]);
  });
});

describe('PSK files', () => {
  test('identity:hexkey lines, comments and blank lines', () => {
    const keys = parsePskFile('# keys\n\nalice:0011aabb\nbob:ff\n');
    expect([...keys.keys()]).toEqual(['alice', 'bob']);
    expect(keys.get('alice')!.toString('hex')).toBe('0011aabb');
  });

  test('malformed lines name the line', () => {
    expect(() => parsePskFile('alice:00\nbroken\n', 'f.psk')).toThrow(/f\.psk: line 2/);
    expect(() => parsePskFile('alice:0g\n')).toThrow(/line 1/);
    expect(() => parsePskFile('alice:abc\n')).toThrow(/line 1/);
    expect(() => parsePskFile('\n# nothing\n')).toThrow(/no keys/);
  });
});

describe('buffer pool', () => {
  test('recycles power-of-two classes up to its limit', () => {
    const pool = new BufferPool(1024 * 1024);
    const a = pool.get(256 * 1024);
    expect(a.length).toBe(256 * 1024);
    const b = pool.get(5000);
    expect(b.length).toBe(8192);
    pool.put(a);
    pool.put(b);
    expect(pool.held).toBe(256 * 1024 + 8192);
    expect(pool.get(200 * 1024)).toBe(a);
    expect(pool.get(8192)).toBe(b);
    expect(pool.held).toBe(0);
    expect(pool.get(100).length).toBe(100); // from Node's slab, never pooled
    pool.put(Buffer.alloc(100));
    pool.put(Buffer.alloc(3000 * 1024));
    expect(pool.held).toBe(0);
    for (let i = 0; i < 8; i++) pool.put(Buffer.alloc(256 * 1024));
    expect(pool.held).toBe(1024 * 1024);
  });
});

describe('request checks', () => {
  const ctx = { size: 1 << 20, readOnly: false, structured: true, baseAllocation: true, ending: false };
  function req(type: number, offset: number, length: number, flags = 0): Req {
    const r = new Req();
    Object.assign(r, { type, offset, offsetLo: offset >>> 0, length, flags });
    return r;
  }

  test('valid requests pass', () => {
    expect(checkRequest(req(C.CMD_READ, 0, 4096, C.CMD_FLAG_FUA | C.CMD_FLAG_DF), ctx)).toBe(0);
    expect(checkRequest(req(C.CMD_WRITE, (1 << 20) - 512, 512), ctx)).toBe(0);
    expect(checkRequest(req(C.CMD_FLUSH, 0, 0), ctx)).toBe(0);
    expect(checkRequest(req(C.CMD_WRITE_ZEROES, 0, 1 << 20, C.CMD_FLAG_NO_HOLE), ctx)).toBe(0);
    expect(checkRequest(req(C.CMD_BLOCK_STATUS, 0, 4096, C.CMD_FLAG_REQ_ONE), ctx)).toBe(0);
    expect(checkRequest(req(C.CMD_CACHE, 512, 512), ctx)).toBe(0);
  });

  test('each rule gives its errno', () => {
    expect(checkRequest(req(C.CMD_READ, 0, 512), { ...ctx, ending: true })).toBe(C.NBD_ESHUTDOWN);
    expect(checkRequest(req(8, 0, 512), ctx)).toBe(C.NBD_EINVAL);
    expect(checkRequest(req(C.CMD_READ, 0, 512, 1 << 5), ctx)).toBe(C.NBD_EINVAL);
    expect(checkRequest(req(C.CMD_WRITE, 0, 512, C.CMD_FLAG_NO_HOLE), ctx)).toBe(C.NBD_EINVAL);
    expect(checkRequest(req(C.CMD_READ, 0, 512, C.CMD_FLAG_DF), { ...ctx, structured: false })).toBe(C.NBD_EINVAL);
    expect(checkRequest(req(C.CMD_FLUSH, 512, 0), ctx)).toBe(C.NBD_EINVAL);
    expect(checkRequest(req(C.CMD_TRIM, 0, 512), { ...ctx, readOnly: true })).toBe(C.NBD_EPERM);
    expect(checkRequest(req(C.CMD_WRITE, 1 << 20, 512), { ...ctx, readOnly: true })).toBe(C.NBD_EPERM);
    expect(checkRequest(req(C.CMD_BLOCK_STATUS, 0, 512), { ...ctx, baseAllocation: false })).toBe(C.NBD_EINVAL);
    expect(checkRequest(req(C.CMD_READ, 0, 0), ctx)).toBe(C.NBD_EINVAL);
    expect(checkRequest(req(C.CMD_READ, 1, 512), ctx)).toBe(C.NBD_EINVAL);
    expect(checkRequest(req(C.CMD_READ, 0, 511), ctx)).toBe(C.NBD_EINVAL);
    expect(checkRequest(req(C.CMD_READ, 1 << 20, 512), ctx)).toBe(C.NBD_EINVAL);
    expect(checkRequest(req(C.CMD_TRIM, (1 << 20) - 512, 1024), ctx)).toBe(C.NBD_EINVAL);
    expect(checkRequest(req(C.CMD_WRITE, (1 << 20) - 512, 1024), ctx)).toBe(C.NBD_ENOSPC);
    expect(checkRequest(req(C.CMD_WRITE_ZEROES, 2 ** 52, 512), ctx)).toBe(C.NBD_ENOSPC);
    expect(checkRequest(req(C.CMD_READ, 0, 33 << 20), { ...ctx, size: 64 << 20 })).toBe(C.NBD_EOVERFLOW);
    expect(checkRequest(req(C.CMD_WRITE_ZEROES, 0, 512, C.CMD_FLAG_FAST_ZERO), ctx)).toBe(C.NBD_ENOTSUP);
  });

  test('a short final sector is allowed on an export whose size is not sector-aligned', () => {
    const odd = { ...ctx, size: 1000 };
    expect(checkRequest(req(C.CMD_READ, 512, 488), odd)).toBe(0);
    expect(checkRequest(req(C.CMD_READ, 0, 488), odd)).toBe(C.NBD_EINVAL);
  });
});

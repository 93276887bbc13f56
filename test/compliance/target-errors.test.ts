/**
 * Every constructor error path of every built-in target, with the exact message the table
 * loader reports: `NAME: line N: TARGET: detail`. Each case runs as line 1 or as line 2
 * (after a zero target), and afterwards no failed table may hold a backing device open.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DeviceMapper, TableError } from '../../src/index.ts';
import { makeImage, makeTempDir } from './helpers.ts';

const IMG_SECTORS = 8192;
const INT_EXPECT = 'expected a non-negative integer';
const U32 = 'expected an integer from 0 to 4294967295';

/** [target length, arguments, message]; `$IMG` and `$MISSING` stand for paths */
type ErrorCase = [length: number, args: string, message: string];

const TARGETS: Array<{ type: string; cases: ErrorCase[] }> = [
  { type: 'linear', cases: [
    [64, '$IMG', 'invalid argument count (expected <dev> <offset>)'],
    [64, '$IMG 0 1', 'invalid argument count (expected <dev> <offset>)'],
    [64, '$IMG x', `invalid device sector 'x' (${INT_EXPECT})`],
    [64, '$IMG -1', `invalid device sector '-1' (${INT_EXPECT})`],
    [64, '$MISSING 0', 'device lookup failed: $MISSING: no such file or device'],
    [64, '$IMG 8190', 'device too small for target: $IMG has 8192 sectors, needs 8254 (offset 8190 + length 64)'],
  ] },
  { type: 'striped', cases: [
    [64, '2', 'not enough arguments (expected <#stripes> <chunk_sectors> (<dev> <offset>)…)'],
    [64, '0 8 $IMG 0', "invalid stripe count '0' (expected an integer from 1 to 4294967295)"],
    [64, 'two 8 $IMG 0 $IMG 100', "invalid stripe count 'two' (expected an integer from 1 to 4294967295)"],
    [64, '2 x $IMG 0 $IMG 100', `invalid chunk size 'x' (${U32})`],
    [64, '2 0 $IMG 0 $IMG 100', "invalid chunk size '0' (must be a multiple of 8 sectors, at least 8)"],
    [64, '2 4 $IMG 0 $IMG 100', "invalid chunk size '4' (must be a multiple of 8 sectors, at least 8)"],
    [96, '2 12 $IMG 0 $IMG 100', "invalid chunk size '12' (must be a multiple of 8 sectors, at least 8)"],
    [63, '2 8 $IMG 0 $IMG 100', 'target length not divisible by number of stripes: 63 sectors over 2 stripes'],
    [48, '2 16 $IMG 0 $IMG 100', 'target length not divisible by chunk size: 48 sectors over 2 stripes is 24 per stripe, not a multiple of 16'],
    [64, '2 8 $IMG 0', 'not enough destinations: 2 stripes need 2 <dev> <offset> pairs, got 2 argument(s)'],
    [64, '2 8 $IMG 0 $IMG 100 extra', "too many arguments (unexpected 'extra')"],
    [64, '2 8 $IMG 0 $IMG x', `invalid stripe 1 offset 'x' (${INT_EXPECT})`],
    [64, '2 8 $IMG 0 $MISSING 0', 'stripe 1: device lookup failed: $MISSING: no such file or device'],
    [64, '2 8 $IMG 8170 $IMG 0', 'stripe 0: device too small for target: $IMG has 8192 sectors, needs 8202 (offset 8170 + length 32)'],
  ] },
  { type: 'zero', cases: [
    [8, 'x', "too many arguments (unexpected 'x')"],
  ] },
  { type: 'error', cases: [
    [8, 'a', 'invalid argument count (expected none, or <dev> <offset> which is ignored)'],
    [8, 'a b c', 'invalid argument count (expected none, or <dev> <offset> which is ignored)'],
  ] },
  { type: 'delay', cases: [
    [64, '$IMG 0', 'invalid argument count 2 (expected 3, 6 or 9: <dev> <offset> <delay_ms> for reads, then writes, then flushes)'],
    [64, '$IMG 0 5 $IMG', 'invalid argument count 4 (expected 3, 6 or 9: <dev> <offset> <delay_ms> for reads, then writes, then flushes)'],
    [64, '$IMG 0 5 $IMG 0 5 $IMG 0 5 x', 'invalid argument count 10 (expected 3, 6 or 9: <dev> <offset> <delay_ms> for reads, then writes, then flushes)'],
    [64, '$IMG x 5', `invalid read offset 'x' (${INT_EXPECT})`],
    [64, '$IMG 0 -5', "invalid read delay '-5' (expected an integer from 0 to 2147483647)"],
    [64, '$IMG 0 2147483648', "invalid read delay '2147483648' (expected an integer from 0 to 2147483647)"],
    [64, '$IMG 0 5 $IMG 0 1.5', "invalid write delay '1.5' (expected an integer from 0 to 2147483647)"],
    [64, '$IMG 0 5 $IMG 0 5 $IMG y 5', `invalid flush offset 'y' (${INT_EXPECT})`],
    [64, '$IMG 0 5 $MISSING 0 5', 'device lookup failed: $MISSING: no such file or device'],
    [64, '$IMG 0 5 $IMG 0 5 $IMG 8150 0', 'device too small for target: $IMG has 8192 sectors, needs 8214 (offset 8150 + length 64)'],
  ] },
  { type: 'flakey', cases: [
    [64, '$IMG 0 1', 'invalid argument count (expected <dev> <offset> <up_s> <down_s> [<#features> <feature>…])'],
    [64, '$IMG x 1 1', `invalid device sector 'x' (${INT_EXPECT})`],
    [64, '$IMG 0 x 1', `invalid up interval 'x' (${U32})`],
    [64, '$IMG 0 1 4294967296', `invalid down interval '4294967296' (${U32})`],
    [64, '$IMG 0 0 0', 'total (up + down) interval is zero'],
    [64, '$IMG 0 4294967295 1', 'interval overflow: up + down is 4294967296 seconds (at most 4294967295)'],
    [64, '$IMG 0 0 1 12', "invalid feature count '12' (expected an integer from 0 to 11)"],
    [64, '$IMG 0 0 1 2 drop_writes', 'not enough arguments for feature (expected 2, got 1)'],
    [64, '$IMG 0 0 1 1 drop_writes extra', "too many arguments (unexpected 'extra')"],
    [64, '$IMG 0 0 1 1 bogus', "unknown feature 'bogus'"],
    [64, '$IMG 0 0 1 2 drop_writes DROP_WRITES', 'feature drop_writes given twice'],
    [64, '$IMG 0 0 1 2 drop_writes error_writes', 'feature drop_writes conflicts with feature error_writes'],
    [64, '$IMG 0 0 1 2 error_writes drop_writes', 'feature drop_writes conflicts with feature error_writes'],
    [64, '$IMG 0 0 1 3 corrupt_bio_byte 1 r', 'feature corrupt_bio_byte needs 4 parameters: <nth_byte> <r|w> <value> <flags>'],
    [64, '$IMG 0 0 1 5 corrupt_bio_byte 0 r 1 0', "invalid corrupt_bio_byte byte number '0' (expected an integer from 1 to 4294967295)"],
    [64, '$IMG 0 0 1 5 corrupt_bio_byte 1 x 1 0', "invalid corrupt_bio_byte direction 'x' (expected r or w)"],
    [64, '$IMG 0 0 1 5 corrupt_bio_byte 1 r 256 0', "invalid corrupt_bio_byte value '256' (expected an integer from 0 to 255)"],
    [64, '$IMG 0 0 1 5 corrupt_bio_byte 1 r 1 -1', `invalid corrupt_bio_byte flags '-1' (${U32})`],
    [64, '$IMG 0 0 1 1 random_read_corrupt', 'feature random_read_corrupt needs a parameter: <probability> in parts per 1000000000'],
    [64, '$IMG 0 0 1 2 random_write_corrupt 1000000001', "invalid random_write_corrupt probability '1000000001' (expected an integer from 0 to 1000000000)"],
    [64, '$IMG 0 0 1 6 drop_writes corrupt_bio_byte 1 w 0 0', 'feature drop_writes conflicts with random_write_corrupt and with corrupt_bio_byte in direction w'],
    [64, '$IMG 0 0 1 3 error_writes random_write_corrupt 5', 'feature error_writes conflicts with random_write_corrupt and with corrupt_bio_byte in direction w'],
    [64, '$IMG 0 0 1 6 corrupt_bio_byte 1 r 0 0 error_reads', 'feature error_reads conflicts with random_read_corrupt and with corrupt_bio_byte in direction r'],
    [64, '$MISSING 0 0 1', 'device lookup failed: $MISSING: no such file or device'],
    [64, '$IMG 8190 1 1', 'device too small for target: $IMG has 8192 sectors, needs 8254 (offset 8190 + length 64)'],
  ] },
];

let dir: string;
let img: string;
let missing: string;
let dm: DeviceMapper;

beforeEach(() => {
  dir = makeTempDir();
  img = makeImage(dir, 'a.img', IMG_SECTORS, 3);
  missing = path.join(dir, 'missing.img');
  dm = new DeviceMapper();
});

afterEach(async () => {
  await dm.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

const fill = (s: string): string => s.replaceAll('$IMG', img).replaceAll('$MISSING', missing);

describe.each(TARGETS)('(f) $type constructor errors', ({ type, cases }) => {
  it.each(cases.map((c, i) => [i % 2 + 1, ...c] as const))('line %i, length %i: %s', async (line, length, args, message) => {
    const entry = `${length} ${type} ${fill(args)}`;
    const table = line === 1 ? `0 ${entry}` : `0 8 zero\n8 ${entry}`;
    const err = await dm.create('vol', { table }).then(() => null, (e: unknown) => e);
    expect(err).toBeInstanceOf(TableError);
    expect((err as TableError).code).toBe('EINVAL');
    expect((err as Error).message).toBe(`vol: line ${line}: ${type}: ${fill(message)}`);
    expect(dm.has('vol')).toBe(false);
    expect(dm.targets.uses(type)).toBe(0);
    // nothing stays open: a second engine can take the image's exclusive lock
    const other = new DeviceMapper();
    await other.create('probe', { table: `0 8 linear ${img} 0` });
    await other.close();
  });
});

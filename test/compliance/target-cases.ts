/**
 * The table of target cases the compliance suite runs against, each with an independent
 * reference model: for every device sector, where a read comes from and where a write
 * goes (a sector of a backing image, zeroes, nowhere, or an error). The model is written
 * from the target documentation, not from the target code.
 */

/** a sector of backing image `file` */
export interface Loc {
  file: number;
  sector: number;
}
export type ReadPlace = Loc | 'zero' | 'error';
export type WritePlace = Loc | 'drop' | 'error';

interface Segment {
  length: number;
  /** the table line after `<start> <length> `, given the references of the images */
  line(refs: readonly string[]): string;
  read(rel: number): ReadPlace;
  write(rel: number): WritePlace;
  /** target-relative sectors where the mapping jumps (chunk edges) */
  edges: number[];
  /** images a flush must reach */
  flushes: number[];
}

export interface TargetCase {
  name: string;
  /** device size in sectors */
  sectors: number;
  table(refs: readonly string[]): string;
  read(sector: number): ReadPlace;
  write(sector: number): WritePlace;
  /** device sectors where the mapping jumps: target starts and chunk edges */
  boundaries: number[];
  /** images a flush must reach (through every target that forwards flushes) */
  flushes: number[];
}

/** each backing image has this many sectors (8 MiB) */
export const IMAGE_SECTORS = 16384;
export const IMAGES = 3;

const range = (n: number, step: number): number[] => Array.from({ length: n }, (_, i) => (i + 1) * step);

export function linear(length: number, file: number, offset: number): Segment {
  return {
    length,
    line: (refs) => `linear ${refs[file]} ${offset}`,
    read: (rel) => ({ file, sector: offset + rel }),
    write: (rel) => ({ file, sector: offset + rel }),
    edges: [],
    flushes: [file],
  };
}

/** the layout as rows: row r holds chunk r of every stripe side by side */
export function striped(length: number, chunk: number, stripes: Array<[file: number, offset: number]>): Segment {
  const rowSize = chunk * stripes.length;
  const place = (rel: number): Loc => {
    const row = Math.floor(rel / rowSize);
    const column = Math.floor((rel % rowSize) / chunk);
    const [file, offset] = stripes[column]!;
    return { file, sector: offset + row * chunk + (rel % chunk) };
  };
  return {
    length,
    line: (refs) => `striped ${stripes.length} ${chunk} ${stripes.map(([f, o]) => `${refs[f]} ${o}`).join(' ')}`,
    read: place,
    write: place,
    edges: range(length / chunk - 1, chunk),
    flushes: [...new Set(stripes.map(([f]) => f))],
  };
}

export function zero(length: number): Segment {
  return { length, line: () => 'zero', read: () => 'zero', write: () => 'drop', edges: [], flushes: [] };
}

export function error(length: number): Segment {
  return { length, line: () => 'error', read: () => 'error', write: () => 'error', edges: [], flushes: [] };
}

/** delay classes [file, offset, ms]: reads, then writes, then flushes */
export function delay(length: number, classes: Array<[file: number, offset: number, ms: number]>): Segment {
  const [read] = classes;
  const write = classes[1] ?? read!;
  const flush = classes[2] ?? write;
  return {
    length,
    line: (refs) => `delay ${classes.map(([f, o, ms]) => `${refs[f]} ${o} ${ms}`).join(' ')}`,
    read: (rel) => ({ file: read![0], sector: read![1] + rel }),
    write: (rel) => ({ file: write[0], sector: write[1] + rel }),
    edges: [],
    flushes: [flush[0]],
  };
}

/** flakey that is always up (down interval 0) */
export function flakeyUp(length: number, file: number, offset: number): Segment {
  return { ...linear(length, file, offset), line: (refs) => `flakey ${refs[file]} ${offset} 5 0` };
}

/** flakey that is always down (up interval 0) with drop_writes: reads pass, writes vanish */
export function flakeyDropping(length: number, file: number, offset: number): Segment {
  return {
    length,
    line: (refs) => `flakey ${refs[file]} ${offset} 0 5 1 drop_writes`,
    read: (rel) => ({ file, sector: offset + rel }),
    write: () => 'drop',
    edges: [],
    flushes: [],
  };
}

/** a table of segments one after the other */
export function compose(name: string, segments: Segment[]): TargetCase {
  const starts: number[] = [];
  let sectors = 0;
  for (const s of segments) {
    starts.push(sectors);
    sectors += s.length;
  }
  const find = (sector: number): number => {
    let i = segments.length - 1;
    while (starts[i]! > sector) i--;
    return i;
  };
  return {
    name,
    sectors,
    table: (refs) => segments.map((s, i) => `${starts[i]} ${s.length} ${s.line(refs)}`).join('\n'),
    read: (sector) => segments[find(sector)]!.read(sector - starts[find(sector)]!),
    write: (sector) => segments[find(sector)]!.write(sector - starts[find(sector)]!),
    boundaries: segments.flatMap((s, i) => [...(i > 0 ? [starts[i]!] : []), ...s.edges.map((e) => starts[i]! + e)]),
    flushes: [...new Set(segments.flatMap((s) => s.flushes))].sort(),
  };
}

export const CASES: TargetCase[] = [
  compose('linear', [linear(4096, 0, 100)]),
  compose('striped, 2 stripes', [striped(4096, 16, [[0, 8], [1, 0]])]),
  compose('striped, 3 stripes, chunk not a power of 2', [striped(4032, 24, [[0, 0], [1, 40], [2, 8]])]),
  compose('striped, 2 stripes on one image', [striped(2048, 64, [[0, 0], [0, 5000]])]),
  compose('zero', [zero(2048)]),
  compose('error', [error(2048)]),
  compose('delay, one class', [delay(4096, [[0, 50, 1]])]),
  compose('delay, read/write/flush classes on different images', [delay(2048, [[0, 0, 1], [1, 16, 2], [2, 0, 1]])]),
  compose('flakey, always up', [flakeyUp(4096, 1, 200)]),
  compose('flakey, always down with drop_writes', [flakeyDropping(2048, 2, 64)]),
  compose('mixed table', [
    linear(1000, 0, 10),
    striped(640, 16, [[1, 0], [2, 0]]),
    zero(200),
    delay(504, [[0, 3000, 1]]),
    flakeyUp(296, 2, 2000),
    striped(1152, 24, [[0, 6000], [1, 6000], [2, 6000]]),
    linear(1000, 1, 3000),
  ]),
  compose('mixed table with an error target', [linear(512, 0, 0), error(64), zero(64), striped(512, 8, [[1, 0], [2, 0]])]),
];

/**
 * The writer process behind NbdWriter (nbd-writer.ts): connects to an NBD URI with the
 * project's NbdClient and writes, appending each acknowledgement to the ack log with a
 * synchronous write (so the log never claims more than was acknowledged).
 * argv[2]: the WriterConfig as JSON. SIGTERM: stop issuing, finish what is in flight,
 * flush, exit 0 (2 if any request failed).
 */
import fs from 'node:fs';
import { NbdClient } from '../../src/nbd/client.ts';
import { prng } from './nbd-tools.ts';
import { writeData, type ListedWrites, type RandomWrites, type WriterConfig } from './nbd-writer.ts';

const cfg = JSON.parse(process.argv[2]!) as WriterConfig;
const fd = fs.openSync(cfg.log, 'a');
const note = (line: string): void => void fs.writeSync(fd, `${line}\n`);
let writes = 0;
let failed = false;
let stopping = false;
process.on('SIGTERM', () => {
  stopping = true;
});

const client = await NbdClient.connect(cfg.uri);

async function write(offset: number, length: number, seed: number): Promise<void> {
  try {
    await client.write(writeData(seed, length), offset);
    note(`W ${offset} ${length} ${seed}`);
    writes++;
  } catch (err) {
    failed = true;
    note(`E write ${offset}+${length}: ${(err as Error).message.replace(/\n/g, ' ')}`);
  }
}

async function flush(): Promise<void> {
  const covered = writes;
  try {
    await client.flush();
    note(`F ${covered}`);
  } catch (err) {
    failed = true;
    note(`E flush: ${(err as Error).message.replace(/\n/g, ' ')}`);
  }
}

async function lane(w: RandomWrites, k: number): Promise<void> {
  const rnd = prng(w.seed * 131 + k);
  const blocks = Math.floor(w.sizeBytes / w.blockBytes / w.lanes);
  for (let n = 1; !stopping; n++) {
    const block = Math.floor(rnd() * blocks) * w.lanes + k;
    await write(block * w.blockBytes, w.blockBytes, (w.seed * 1_000_003 + k * 65_537 + n) >>> 0);
    if (w.flushEvery > 0 && n % w.flushEvery === 0) await flush();
  }
}

async function listed(w: ListedWrites): Promise<void> {
  await Promise.all(w.writes.map((x) => write(x.offset, x.length, x.seed)));
  if (w.flush) await flush();
  note('L done');
  while (!stopping) await new Promise((r) => setTimeout(r, 50));
}

const work = cfg.work.kind === 'random'
  ? Promise.all(Array.from({ length: cfg.work.lanes }, (_, k) => lane(cfg.work as RandomWrites, k)))
  : listed(cfg.work);

process.stdout.write('READY\n');
await work;
await flush();
await client.close();
fs.closeSync(fd);
process.stdout.write(`DONE ${writes}\n`);
process.exit(failed ? 2 : 0);

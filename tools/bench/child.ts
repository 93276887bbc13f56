/**
 * Measured code runs in worker processes, one per side of a comparison, so each side has its
 * own JIT state, heap and peak RSS, and both get exactly the same environment.
 *
 * A worker is a TypeScript file run through tsx with its setup spec as one JSON argument. It
 * sets up once, prints `{"ready":true}`, then answers each JSON command line on stdin with
 * one JSON result line on stdout, and exits when stdin closes. Keeping the two workers alive
 * across the runs of a comparison lets runs be short and alternate often, which is what
 * cancels the noise of a shared machine; each run still re-warms what it needs.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export interface Worker<C, R> {
  /** the worker's first line (`{"ready":true, …}`: it may carry more, e.g. ports) */
  readonly ready: Record<string, unknown>;
  run(cmd: C): Promise<R>;
  /** close stdin and wait for the exit */
  close(): Promise<void>;
}

export async function startWorker<C, R>(
  worker: string, spec: unknown, env: Readonly<Record<string, string>>,
): Promise<Worker<C, R>> {
  const name = path.basename(worker);
  // DMKIT_BENCH_NODE_ARGS: node flags for every worker (profiling: `--cpu-prof --cpu-prof-dir=DIR`,
  // which NODE_OPTIONS does not allow)
  const nodeArgs = (process.env.DMKIT_BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const child = spawn(process.execPath, [...nodeArgs, '--import', 'tsx', worker, JSON.stringify(spec)], {
    cwd: REPO_ROOT,
    env: { ...process.env, ...env },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const lines = createInterface({ input: child.stdout });
  const waiting: Array<{ resolve: (v: unknown) => void; reject: (e: Error) => void }> = [];
  let exited: Error | null = null;
  lines.on('line', (line) => {
    const w = waiting.shift();
    if (!w) return;
    try {
      w.resolve(JSON.parse(line));
    } catch {
      w.reject(new Error(`${name}: unexpected output: ${line}`));
    }
  });
  const exitPromise = new Promise<void>((resolve) => {
    child.on('close', (code, signal) => {
      exited = new Error(`${name} exited with ${signal ?? code}${stderr.trim() ? `: ${stderr.trim()}` : ''}`);
      for (const w of waiting.splice(0)) w.reject(exited);
      resolve();
    });
  });
  child.on('error', (err) => {
    for (const w of waiting.splice(0)) w.reject(err);
  });
  const next = <T>(): Promise<T> => {
    if (exited) return Promise.reject(exited);
    return new Promise<T>((resolve, reject) => waiting.push({ resolve: resolve as (v: unknown) => void, reject }));
  };
  const ready = await next<Record<string, unknown>>();
  return {
    ready,
    run(cmd: C): Promise<R> {
      const p = next<R>();
      child.stdin.write(`${JSON.stringify(cmd)}\n`);
      return p;
    },
    async close(): Promise<void> {
      child.stdin.end();
      await exitPromise;
    },
  };
}

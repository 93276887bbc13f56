/**
 * nbdkit as a remote disk for e2e tests: `nbdkit -f -U SOCK PLUGIN ARGS…` in the
 * foreground, ready once its pid file is written, gone with the test process.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { requireTools, TOOL_PATH } from './nbd-tools.ts';

export interface Nbdkit {
  proc: ChildProcess;
  sock: string;
  /** `nbd+unix:///?socket=SOCK` (the default export) */
  uri: string;
  /** SIGKILL, resolved once it has exited */
  kill(): Promise<void>;
}

export async function startNbdkit(sock: string, args: string[]): Promise<Nbdkit> {
  requireTools(['nbdkit']);
  const pidFile = `${sock}.pid`;
  fs.rmSync(pidFile, { force: true });
  const proc = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', sock, '-P', pidFile, ...args], {
    stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, PATH: TOOL_PATH },
  });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => proc.on('exit', () => resolve()));
  for (const end = Date.now() + 10_000; !fs.existsSync(pidFile) || fs.statSync(pidFile).size === 0; ) {
    if (proc.exitCode !== null || Date.now() > end) throw new Error(`nbdkit ${args.join(' ')} did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    proc, sock, uri: `nbd+unix:///?socket=${sock}`,
    async kill() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      await exited;
    },
  };
}

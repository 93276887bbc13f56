/**
 * dmkit: dmsetup's verbs against the dmkit daemon (`npx dmkit …`, `bin/dmkit.js`).
 * Failures print `dmkit: <reason>` on stderr and exit with status 1 (3 when no daemon runs
 * and none may be started). See docs/cli.md.
 */
import { CommanderError } from 'commander';
import { buildProgram } from './cli/commands.ts';
import { NO_DAEMON_STATUS, NoDaemonError } from './cli/connect.ts';

try {
  await buildProgram().parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) {
    // commander has printed its message already; help and --version exit 0
    process.exitCode = err.exitCode;
  } else {
    process.stderr.write(`dmkit: ${(err as Error).message ?? String(err)}\n`);
    process.exitCode = err instanceof NoDaemonError ? NO_DAEMON_STATUS : 1;
  }
}

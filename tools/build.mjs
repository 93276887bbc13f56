// Bundles the CLI (and the daemon it starts) into dist/dmkit.mjs so a dmkit command starts in
// ~0.1 s instead of compiling TypeScript on every call, and the NBD connection thread into
// dist/conn-worker.mjs (a thread that loads tsx and compiles its modules holds ~25 MiB more),
// and the digest thread into dist/digest-worker.mjs.
// Each is used only while it is newer than every source file (tools/bundle-fresh.mjs);
// otherwise the sources run through tsx. `node tools/build.mjs OUTDIR` writes them to OUTDIR
// instead (a test runs the daemon from a bundle of its own that way).
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const outdir = path.resolve(process.argv[2] ?? path.join(root, 'dist'));

const common = {
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  packages: 'external',
  sourcemap: 'linked',
  logLevel: 'warning',
  absWorkingDir: root,
  banner: { js: "import { createRequire as __dmkitCreateRequire } from 'node:module'; const require = __dmkitCreateRequire(import.meta.url);" },
};

await Promise.all([
  build({ ...common, entryPoints: ['tools/dmkit.ts'], outfile: path.join(outdir, 'dmkit.mjs') }),
  build({ ...common, entryPoints: ['src/nbd/conn-worker.ts'], outfile: path.join(outdir, 'conn-worker.mjs') }),
  // the digest thread (src/core/digest.ts loads it from beside the bundle)
  build({ ...common, entryPoints: ['src/core/digest-worker.mjs'], outfile: path.join(outdir, 'digest-worker.mjs') }),
]);

/**
 * Tuning knobs read from the environment (docs/cli.md lists them). A value that is not a
 * non-negative integer is ignored: a typo must not turn a knob into NaN on the hot path.
 */
export function envCount(name: string, fallback: number, env: NodeJS.ProcessEnv = process.env): number {
  const v = env[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  return Number.isSafeInteger(n) && n >= 0 ? n : fallback;
}

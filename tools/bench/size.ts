/** Byte sizes on the command line: `4096`, `256k`, `64M`, `1G` (binary units). */

const UNITS: Record<string, number> = { '': 1, k: 1 << 10, m: 1 << 20, g: 1 << 30, t: 2 ** 40 };

export function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$/i.exec(text.trim());
  if (!m) throw new Error(`invalid size '${text}' (e.g. 4096, 256k, 64M, 1G)`);
  return Math.round(Number(m[1]) * UNITS[m[2]!.toLowerCase()]!);
}

export function formatSize(bytes: number): string {
  for (const [u, n] of [['TiB', 2 ** 40], ['GiB', 1 << 30], ['MiB', 1 << 20], ['KiB', 1 << 10]] as const) {
    if (bytes >= n && bytes % n === 0) return `${bytes / n} ${u}`;
  }
  return `${bytes} B`;
}

/**
 * Plugins: modules anywhere on disk that add target types, dirty log types, slink
 * transports and replog implementations to a running engine (`dm.loadPlugin(path)`,
 * `dmkit daemon --plugin PATH`).
 *
 * A plugin imports dmkit by its package name (`import { ArgReader } from 'dmkit'`) from
 * whatever directory it lives in: the first load registers a module resolution hook
 * (node:module `register`, Node ≥ 20.6) that resolves the bare specifier `dmkit` to a small
 * module re-exporting the API of the dmkit that is running, from its sources under tsx or
 * from the esbuild bundle alike. A plugin thus shares the engine's classes and registries
 * (`instanceof TargetArgError` holds; `registerDirtyLog` reaches the registry the mirror
 * creates its logs from), which a second copy of dmkit in some node_modules would not. The
 * same API is the second argument of `register(dm, api)`.
 *
 * A plugin module exports one of:
 * - `register(dm, api)`, called with the engine and the API (`api.registerTarget`, …);
 * - arrays `targets`, `dirtyLogs`, `slinks`, `replogs` (named exports, or those keys on a
 *   default-exported object);
 * - `export default` a target type or an array of target types;
 * - nothing, having registered its types itself when imported (`registerDirtyLog` … of `dmkit`).
 * A load registers all or nothing: when it fails, what it had registered is unregistered.
 */
import nodeModule from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { DmError } from './core/errors.ts';
import type { TargetType } from './core/types.ts';
import { listDirtyLogs, registerDirtyLog, unregisterDirtyLog } from './dirtylog/registry.ts';
import type { DirtyLogType } from './dirtylog/types.ts';
import type { DeviceMapper } from './index.ts';
import type { ReplogType } from './replog/types.ts';
import type { SiteLinkType } from './slink/types.ts';

/** What `register(dm, api)` gets: everything `import … from 'dmkit'` gives, and the registrations. */
export interface PluginApi {
  /** add a target type to the engine loading the plugin (`dm.targets.register`) */
  registerTarget(type: TargetType): void;
  /** add a dirty log type (process-wide, as every registry below) */
  registerDirtyLog(type: DirtyLogType): void;
  /** add a slink transport; ENOTSUP where this dmkit has no slink registry */
  registerSlink(type: SiteLinkType): void;
  /** add a replog implementation; ENOTSUP where this dmkit has no replog registry */
  registerReplog(type: ReplogType): void;
  readonly [name: string]: unknown;
}

/** The shapes a plugin module may have (for plugins written in TypeScript). */
export interface PluginModule {
  register?(dm: DeviceMapper, api: PluginApi): void | Promise<void>;
  targets?: readonly TargetType[];
  dirtyLogs?: readonly DirtyLogType[];
  slinks?: readonly SiteLinkType[];
  replogs?: readonly ReplogType[];
}

type KindKey = 'targets' | 'dirtyLogs' | 'slinks' | 'replogs';
const KIND_KEYS: readonly KindKey[] = ['targets', 'dirtyLogs', 'slinks', 'replogs'];

/** One registry a plugin can add to; null members: this dmkit has none of that kind. */
interface Kind {
  readonly key: KindKey;
  /** 'slink type', for messages */
  readonly what: string;
  /** how loadPlugin reports a name of this kind (targets: the plain name) */
  readonly prefix: string;
  readonly register: ((item: never) => void) | null;
  readonly unregister: ((name: string) => void) | null;
  readonly list: (() => string[]) | null;
}

type Api = Record<string, unknown>;
type RegisterFn = (dm: DeviceMapper, api: PluginApi) => unknown;
/** `x` if it is a function (of the type the caller expects), else null */
const fn = <F>(x: unknown): F | null => (typeof x === 'function' ? (x as F) : null);

/**
 * Load a plugin module into `dm`. Returns the names it registered: target types by name,
 * the others as `dirtylog:NAME`, `slink:NAME`, `replog:NAME`.
 */
export async function loadPlugin(dm: DeviceMapper, modulePath: string): Promise<string[]> {
  const ns = (await import('./index.ts')) as unknown as Api;
  installResolver(ns);
  const kinds = registries(dm, ns);
  const api = pluginApi(dm, ns, kinds);
  const before = kinds.map((k) => new Set(k.list?.() ?? []));
  const added = (): string[][] => kinds.map((k, i) => (k.list?.() ?? []).filter((n) => !before[i]!.has(n)));
  const mod = await importPlugin(modulePath);
  try {
    const register = fn<RegisterFn>(mod.register);
    if (register) await register(dm, api);
    else if (!registerDeclared(modulePath, mod, kinds) && !added().some((names) => names.length)) {
      throw new DmError('EINVAL', `plugin ${modulePath}: expected register(dm, api), arrays ${KIND_KEYS.join('/')}, or a default-exported target type ({name, version, create}) or array of them`);
    }
  } catch (err) {
    const undo = added();
    for (let i = kinds.length - 1; i >= 0; i--) {
      for (const name of undo[i]!.reverse()) {
        try {
          kinds[i]!.unregister?.(name);
        } catch {
          /* an alias goes with its type; nothing else can be in use yet */
        }
      }
    }
    throw err;
  }
  return added().flatMap((names, i) => names.map((n) => kinds[i]!.prefix + n));
}

/**
 * Register what a module declares; false when it declares nothing (a module that registered
 * its types itself when imported, through `dmkit`'s register functions, is fine too).
 */
function registerDeclared(where: string, mod: Api, kinds: Kind[]): boolean {
  const decl = declared(mod);
  if (!decl) return false;
  for (const k of kinds) {
    const list = decl[k.key];
    if (list === undefined) continue;
    if (!Array.isArray(list)) throw new DmError('EINVAL', `plugin ${where}: ${k.key} must be an array of ${k.what}s`);
    if (list.length && !k.register) throw new DmError('ENOTSUP', `plugin ${where}: this dmkit has no ${k.what} registry`);
    list.forEach((item: unknown, i) => {
      const t = item as { name?: unknown; create?: unknown } | null;
      if (!t || typeof t.name !== 'string' || typeof t.create !== 'function') {
        throw new DmError('EINVAL', `plugin ${where}: ${k.key}[${i}] is not a ${k.what} ({name, ${k.key === 'targets' ? 'version, ' : ''}create})`);
      }
      k.register!(item as never);
    });
  }
  return true;
}

/** the kind arrays a module declares, or null when it declares none */
function declared(mod: Api): Partial<Record<KindKey, unknown>> | null {
  const pick = (o: Api): Partial<Record<KindKey, unknown>> | null =>
    KIND_KEYS.some((k) => o[k] !== undefined) ? Object.fromEntries(KIND_KEYS.map((k) => [k, o[k]])) : null;
  const d = mod.default as Api | unknown[] | undefined | null;
  if (Array.isArray(d)) return { targets: d };
  if (d && typeof d === 'object' && typeof d.create === 'function') return { targets: [d] };
  return pick(mod) ?? (d && typeof d === 'object' ? pick(d) : null);
}

async function importPlugin(modulePath: string): Promise<Api> {
  const url = pathToFileURL(path.resolve(modulePath)).href;
  try {
    return (await import(url)) as Api;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ERR_UNKNOWN_FILE_EXTENSION' && /\.[cm]?ts$/.test(modulePath)) {
      // a TypeScript plugin while dmkit runs from its bundle, without tsx: load it through tsx
      // (a failed import stays failed for its URL, hence tsImport rather than a second import)
      const { tsImport } = await import('tsx/esm/api');
      return (await tsImport(url, import.meta.url)) as Api;
    }
    if (code === 'ERR_MODULE_NOT_FOUND' && /'dmkit'/.test((err as Error).message) && !nodeModule.register) {
      (err as Error).message += ` (Node ${process.version} cannot resolve 'dmkit' for plugins: use Node ≥ 20.6, or take the API from register(dm, api))`;
    }
    throw err;
  }
}

// ---- the registries ----

/**
 * The registries plugins can add to. Targets are the engine's own; dirty logs, slinks and
 * replogs are process-wide, found among the API's exports by name (`registerX`,
 * `unregisterX`, `listXs`), so a kind this dmkit lacks is refused with ENOTSUP.
 */
function registries(dm: DeviceMapper, ns: Api): Kind[] {
  const byName = (key: KindKey, what: string, x: string): Kind => ({
    key, what, prefix: `${x.toLowerCase()}:`,
    register: fn(ns[`register${x}`]), unregister: fn(ns[`unregister${x}`]), list: fn(ns[`list${x}s`]),
  });
  return [
    {
      key: 'targets', what: 'target type', prefix: '',
      register: (t: TargetType) => dm.targets.register(t),
      unregister: (n) => dm.targets.unregister(n),
      list: () => dm.targets.list().map((t) => t.name),
    },
    { key: 'dirtyLogs', what: 'dirty log type', prefix: 'dirtylog:', register: registerDirtyLog, unregister: unregisterDirtyLog, list: listDirtyLogs },
    byName('slinks', 'slink type', 'Slink'),
    byName('replogs', 'replog type', 'Replog'),
  ];
}

function pluginApi(dm: DeviceMapper, ns: Api, kinds: Kind[]): PluginApi {
  const reg = (key: KindKey): ((item: never) => void) => {
    const k = kinds.find((x) => x.key === key)!;
    return k.register ?? (() => {
      throw new DmError('ENOTSUP', `this dmkit has no ${k.what} registry`);
    });
  };
  return {
    ...ns,
    registerTarget: (t: TargetType) => dm.targets.register(t),
    registerDirtyLog: reg('dirtyLogs'),
    registerSlink: reg('slinks'),
    registerReplog: reg('replogs'),
  };
}

// ---- resolving `dmkit` from anywhere ----

const API_KEY = Symbol.for('dmkit.plugin-api');
const HOOKED = Symbol.for('dmkit.plugin-resolver');

/**
 * The module resolution hook, run on Node's hooks thread: the bare specifier `dmkit`
 * resolves to the API module (a data: URL), everything else goes down the chain (tsx …).
 */
const RESOLVE_HOOK = `let url;
export function initialize(data) { url = data.url; }
export async function resolve(specifier, context, next) {
  return specifier === 'dmkit' ? { url, format: 'module', shortCircuit: true } : next(specifier, context);
}
`;

const dataUrl = (source: string): string => `data:text/javascript;base64,${Buffer.from(source).toString('base64')}`;

/**
 * Once per process: publish the running API on a global and register the hook. The API
 * module reads that global when a plugin first imports `dmkit`, so it exports the very
 * objects of this dmkit (the first copy to get here, should a process hold two).
 */
function installResolver(ns: Api): void {
  const g = globalThis as unknown as Record<symbol, unknown>;
  if (g[HOOKED]) return;
  g[HOOKED] = true;
  const api = { ...ns };
  g[API_KEY] = api;
  if (!nodeModule.register) return; // Node < 20.6: plugins take the API from register(dm, api)
  const names = Object.keys(api).filter((n) => n !== 'default' && /^[A-Za-z_$][\w$]*$/.test(n));
  const source = [
    `const api = globalThis[Symbol.for('dmkit.plugin-api')];`,
    ...names.map((n, i) => `const _${i} = api[${JSON.stringify(n)}];\nexport { _${i} as ${n} };`),
    'export default api;',
    '',
  ].join('\n');
  nodeModule.register(dataUrl(RESOLVE_HOOK), { data: { url: dataUrl(source) } });
}

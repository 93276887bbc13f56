/**
 * A named-plugin registry (targets, dirty logs, replogs, slinks): refuses duplicates,
 * refuses unregistering while in use, lists what is registered.
 */
import { DmError } from './errors.ts';

export interface Named {
  readonly name: string;
}

export class Registry<T extends Named> {
  readonly #kind: string;
  readonly #items = new Map<string, T>();
  readonly #uses = new Map<string, number>();

  constructor(kind: string) {
    this.#kind = kind;
  }

  register(item: T): void {
    if (!item || typeof item.name !== 'string' || !/^[A-Za-z0-9_.-]{1,64}$/.test(item.name)) {
      throw new DmError('EINVAL', `${this.#kind} registration needs a name of 1–64 characters [A-Za-z0-9_.-]`);
    }
    if (this.#items.has(item.name)) throw new DmError('EEXIST', `${this.#kind} '${item.name}' is already registered`);
    this.#items.set(item.name, item);
  }

  unregister(name: string): void {
    if (!this.#items.has(name)) throw new DmError('ENOENT', `${this.#kind} '${name}' is not registered`);
    const uses = this.#uses.get(name) ?? 0;
    if (uses > 0) throw new DmError('EBUSY', `${this.#kind} '${name}' is in use by ${uses} instance(s)`);
    this.#items.delete(name);
  }

  get(name: string): T | undefined {
    return this.#items.get(name);
  }

  has(name: string): boolean {
    return this.#items.has(name);
  }

  /** sorted by name */
  list(): T[] {
    return [...this.#items.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  /** count an instance of `name` (released by the returned function, once) */
  use(name: string): () => void {
    this.#uses.set(name, (this.#uses.get(name) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const n = (this.#uses.get(name) ?? 1) - 1;
      if (n <= 0) this.#uses.delete(name);
      else this.#uses.set(name, n);
    };
  }

  uses(name: string): number {
    return this.#uses.get(name) ?? 0;
  }
}

/**
 * A minimal typed event emitter that works the same in Node and in browsers (no `node:events`).
 * A listener that throws does not stop the others; its error is reported on the next tick,
 * as an uncaught exception, so that it is not silently lost.
 */
export type Listener<T> = (value: T) => void;

export class Emitter<Events extends { [K in keyof Events]: unknown }> {
  private readonly listeners = new Map<keyof Events, Set<Listener<never>>>();

  /** `onListen`, if given, is told each time a listener is added (after it is added). */
  constructor(private readonly onListen?: (event: keyof Events) => void) {}

  /** Calls `listener` for every `event` until the returned function is called. */
  on<K extends keyof Events>(event: K, listener: Listener<Events[K]>): () => void {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener as Listener<never>);
    this.onListen?.(event);
    return () => this.off(event, listener);
  }

  /** Calls `listener` for the next `event` only. */
  once<K extends keyof Events>(event: K, listener: Listener<Events[K]>): () => void {
    const off = this.on(event, (value) => {
      off();
      listener(value);
    });
    return off;
  }

  off<K extends keyof Events>(event: K, listener: Listener<Events[K]>): void {
    this.listeners.get(event)?.delete(listener as Listener<never>);
  }

  /** Node-style aliases of `on` and `off`. */
  addListener<K extends keyof Events>(event: K, listener: Listener<Events[K]>): () => void {
    return this.on(event, listener);
  }

  removeListener<K extends keyof Events>(event: K, listener: Listener<Events[K]>): void {
    this.off(event, listener);
  }

  /** How many listeners `event` has. */
  listenerCount<K extends keyof Events>(event: K): number {
    return this.listeners.get(event)?.size ?? 0;
  }

  emit<K extends keyof Events>(event: K, value: Events[K]): void {
    const set = this.listeners.get(event);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        (listener as Listener<Events[K]>)(value);
      } catch (error) {
        setTimeout(() => {
          throw error;
        }, 0);
      }
    }
  }
}

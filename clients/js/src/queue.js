// An unbounded async queue: push() never waits; next() waits for an item (with an optional timeout in ms);
// end(error) makes every waiting and later next() reject with `error` once the items are taken.

export class AsyncQueue {
  constructor() {
    this.items = [];
    this.waiters = [];
    this.ended = null;
  }

  get size() {
    return this.items.length;
  }

  push(item) {
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve(item);
    else this.items.push(item);
  }

  end(error) {
    if (this.ended) return;
    this.ended = error;
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
  }

  next(timeout) {
    if (this.items.length) return Promise.resolve(this.items.shift());
    if (this.ended) return Promise.reject(this.ended);
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject };
      if (timeout != null) {
        const timer = setTimeout(() => {
          const at = this.waiters.indexOf(waiter);
          if (at >= 0) this.waiters.splice(at, 1);
          reject(new TimeoutError(`nothing arrived within ${timeout} ms`));
        }, timeout);
        waiter.resolve = (item) => { clearTimeout(timer); resolve(item); };
        waiter.reject = (error) => { clearTimeout(timer); reject(error); };
      }
      this.waiters.push(waiter);
    });
  }
}

/** A wait for something local (the next message, event or change) ran out. */
export class TimeoutError extends Error {
  constructor(message) {
    super(message);
    this.name = "TimeoutError";
  }
}

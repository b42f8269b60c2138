// Test doubles for the client's unit tests: a scripted WebSocket and manual timers.

/** A WebSocket whose server side the test plays. */
export class FakeSocket {
  static instances = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    FakeSocket.instances.push(this);
  }

  static reset() {
    FakeSocket.instances = [];
  }

  static get last() {
    return FakeSocket.instances.at(-1);
  }

  send(data) {
    if (this.readyState !== 1) throw new Error("send on a socket that is not open");
    this.sent.push(JSON.parse(data));
  }

  close(code = 1000, reason = "") {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }

  // -- the server's side --

  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  deliver(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  sentOfType(type) {
    return this.sent.filter((frame) => frame.type === type);
  }
}

/** setTimeout/clearTimeout on a clock the test moves. */
export class ManualTimers {
  constructor() {
    this.now = 0;
    this.pending = new Map();
    this.nextId = 1;
    this.setTimeout = (callback, ms) => {
      const id = this.nextId++;
      this.pending.set(id, { at: this.now + ms, callback, ms });
      return id;
    };
    this.clearTimeout = (id) => {
      this.pending.delete(id);
    };
  }

  /** Delays of the timers now waiting, soonest first. */
  get delays() {
    return [...this.pending.values()].sort((a, b) => a.at - b.at).map((t) => t.ms);
  }

  /** Move the clock by `ms`, running every timer that falls due, in order. */
  advance(ms) {
    const until = this.now + ms;
    for (;;) {
      const due = [...this.pending.entries()].filter(([, t]) => t.at <= until).sort((a, b) => a[1].at - b[1].at);
      if (due.length === 0) break;
      const [id, timer] = due[0];
      this.pending.delete(id);
      this.now = timer.at;
      timer.callback();
    }
    this.now = until;
  }
}

/** Let pending promise callbacks (the async token provider) run. */
export function settle() {
  return new Promise((resolve) => setImmediate(resolve));
}

export function startedFrame(overrides = {}) {
  return {
    type: "started",
    protocol: 1,
    sessionId: "s1",
    userId: "u1",
    mode: "memory",
    state: {},
    history: [],
    lastSeq: 0,
    resumed: false,
    limits: { maxFrameBytes: 65536, ratePerSecond: 20, rateBurst: 40, idleTimeoutSeconds: 120, resumeWindow: 200 },
    ...overrides,
  };
}

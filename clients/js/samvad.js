// Samvad's JavaScript client: one ES module, no dependencies, no build step.
//
// It speaks the real-time protocol of `/ws` (docs/protocol.md): `start`, messages
// acknowledged with per-session sequence numbers, streamed replies, barge-in, state,
// heartbeats, and resume after a dropped connection with automatic reconnection and
// backoff. Every error code and close code maps to an action an app can take
// (`errorAction`, `closeAction`). Types: samvad.d.ts. Guide: docs/clients.md.

/** The protocol version this client speaks (`started.protocol`). */
export const PROTOCOL_VERSION = 1;

/** Frame types a client sends. */
export const CLIENT_FRAME_TYPES = Object.freeze([
  "start",
  "message",
  "interrupt",
  "state",
  "ping",
  "end",
]);

/** Frame types a server sends (`durable` with the zero-loss protocol). */
export const SERVER_FRAME_TYPES = Object.freeze([
  "started",
  "resume",
  "ack",
  "reply.start",
  "reply.chunk",
  "reply.end",
  "interrupted",
  "message",
  "state",
  "pong",
  "error",
  "ended",
  "durable",
]);

/**
 * What an app should do about each `error` frame code.
 *
 * - `fix_request`: the client sent something wrong (a bug; the frame was dropped).
 * - `ignore`: harmless (nothing to interrupt, a second start).
 * - `retry`: the frame was not applied; send it again later (the client keeps
 *   unacknowledged messages and re-sends them after a reconnect or `resendPending()`).
 * - `slow_down`: too many frames; this one was dropped.
 * - `choose_session`: the session id belongs to another user; start another session.
 * - `reauthenticate`: the token is missing, invalid or expired; get a new one.
 * - `sign_out`: the token is for another user; this user may not use the session.
 * - `new_session`: the session has ended; start a new one.
 * - `reconnect`: the connection is closing; the client reconnects and resumes.
 * @type {Readonly<Record<string, {action: string, fatal: boolean, description: string}>>}
 */
export const ERROR_ACTIONS = Object.freeze({
  bad_json: { action: "fix_request", fatal: false, description: "not valid JSON" },
  bad_frame: { action: "fix_request", fatal: false, description: "not a frame object" },
  unknown_type: { action: "fix_request", fatal: false, description: "unknown frame type" },
  invalid_field: { action: "fix_request", fatal: false, description: "a field is missing or wrong" },
  not_started: { action: "fix_request", fatal: false, description: "a frame before start" },
  already_started: { action: "ignore", fatal: false, description: "a second start" },
  session_ended: { action: "new_session", fatal: true, description: "the session has ended" },
  conflict: { action: "choose_session", fatal: true, description: "the session belongs to another user" },
  nothing_to_interrupt: { action: "ignore", fatal: false, description: "no reply to cut" },
  payload_too_large: { action: "fix_request", fatal: false, description: "a state merge past the size bound" },
  backlog_full: { action: "retry", fatal: false, description: "too many writes wait for Firestore; not stored" },
  rate_limited: { action: "slow_down", fatal: false, description: "too many frames; this one was dropped" },
  frame_too_large: { action: "fix_request", fatal: false, description: "a frame over the size limit" },
  auth_unavailable: { action: "retry", fatal: false, description: "the token could not be checked right now" },
  unauthorized: { action: "reauthenticate", fatal: false, description: "token missing or invalid" },
  forbidden: { action: "sign_out", fatal: true, description: "token issued for another user" },
  idle_timeout: { action: "reconnect", fatal: false, description: "no frame for too long" },
  start_timeout: { action: "reconnect", fatal: false, description: "no start in time" },
  internal_error: { action: "reconnect", fatal: false, description: "a server bug; resume" },
});

/**
 * What each close code means for the connection: reconnect (and resume) or stop.
 * @type {Readonly<Record<number, {reconnect: boolean, action: string, description: string}>>}
 */
export const CLOSE_ACTIONS = Object.freeze({
  1000: { reconnect: false, action: "new_session", description: "the session ended" },
  1001: { reconnect: true, action: "reconnect", description: "the server is shutting down" },
  1005: { reconnect: true, action: "reconnect", description: "closed without a code" },
  1006: { reconnect: true, action: "reconnect", description: "the connection was lost" },
  1007: { reconnect: false, action: "fix_request", description: "invalid UTF-8 sent" },
  1008: { reconnect: true, action: "slow_down", description: "kept exceeding the rate limit" },
  1009: { reconnect: true, action: "fix_request", description: "a frame over the size limit" },
  1011: { reconnect: true, action: "reconnect", description: "internal server error" },
  1012: { reconnect: true, action: "reconnect", description: "the server is restarting" },
  1013: { reconnect: true, action: "reconnect", description: "the client read too slowly" },
  4000: { reconnect: true, action: "reconnect", description: "dropped by the client (no heartbeat answer)" },
  4401: { reconnect: true, action: "reauthenticate", description: "unauthorized: a fresh token is needed" },
  4403: { reconnect: false, action: "sign_out", description: "forbidden: the token is for another user" },
  4408: { reconnect: true, action: "reconnect", description: "idle timeout, or no start in time" },
  4410: { reconnect: false, action: "new_session", description: "the session was erased (deleted, or its user refreshed)" },
});

/** The action for an `error` frame code (unknown codes: `retry`, not fatal). */
export function errorAction(code) {
  return ERROR_ACTIONS[code] ?? { action: "retry", fatal: false, description: "unknown error code" };
}

/** The action for a close code (unknown codes: reconnect). */
export function closeAction(code) {
  return CLOSE_ACTIONS[code] ?? { reconnect: true, action: "reconnect", description: "closed" };
}

/** An error from the server (an `error` frame or a close), with what to do about it. */
export class SamvadError extends Error {
  constructor(code, message, { closeCode = null, action = null } = {}) {
    super(message);
    this.name = "SamvadError";
    /** The `error` frame's code, or `close_<code>` for a close without one. */
    this.code = code;
    /** The WebSocket close code, when the connection closed. */
    this.closeCode = closeCode;
    /** What the app should do (see ERROR_ACTIONS / CLOSE_ACTIONS). */
    this.action = action ?? errorAction(code).action;
  }
}

/** Connection states, in `client.status` and `status` events. */
export const Status = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

const DEFAULT_RECONNECT = Object.freeze({
  initialDelay: 250,
  maxDelay: 15000,
  factor: 2,
  jitter: 0.25,
  maxAttempts: Infinity,
});

let clientIdCounter = 0;

function newClientId() {
  const random =
    globalThis.crypto?.randomUUID?.() ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
  clientIdCounter += 1;
  return `c-${random}-${clientIdCounter}`;
}

/**
 * A connection to Samvad's `/ws` for one user and session, kept alive across drops.
 *
 * Listen with `on(type, listener)` to server frame types (`ack`, `reply.chunk`, ...) and
 * to `status`, `frame` (every frame), `reply.resumed`, `reply.lost`, `resume.failed`,
 * `close` (the final close) and `error` (SamvadError).
 */
export class SamvadClient {
  /** @param {import("./samvad").SamvadClientOptions} options */
  constructor(options) {
    if (!options || typeof options.url !== "string") throw new TypeError("SamvadClient needs a url");
    if (typeof options.userId !== "string" || options.userId === "") {
      throw new TypeError("SamvadClient needs a userId");
    }
    this.url = options.url;
    this.userId = options.userId;
    this.sessionId = options.sessionId ?? null;
    this.language = options.language ?? null;
    this.metadata = options.metadata ?? null;
    this.historyLimit = options.historyLimit ?? null;
    this.tokenProvider = options.token ?? null;
    this.heartbeatInterval = options.heartbeatInterval ?? 25000;
    this.heartbeatTimeout = options.heartbeatTimeout ?? 10000;
    this.reconnectOptions =
      options.reconnect === false ? null : { ...DEFAULT_RECONNECT, ...(options.reconnect ?? {}) };
    this.keepUntilDurable = options.keepUntilDurable ?? "auto";
    this.WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    this.timers = {
      setTimeout: options.timers?.setTimeout ?? globalThis.setTimeout.bind(globalThis),
      clearTimeout: options.timers?.clearTimeout ?? globalThis.clearTimeout.bind(globalThis),
    };
    this.random = options.random ?? Math.random;
    if (typeof this.WebSocketImpl !== "function") {
      throw new TypeError("No WebSocket implementation: pass options.WebSocket");
    }

    /** The connection state (see Status). */
    this.status = Status.IDLE;
    /** Highest sequence number seen in this session (sent as resume.lastSeq). */
    this.lastSeq = options.lastSeq ?? null;
    /** Highest sequence number the server reported durable (`durable` frames). */
    this.durableSeq = 0;
    /** The last `started` frame. */
    this.started = null;
    /** The persistence mode the server reported (`firestore`/`memory`). */
    this.mode = null;
    /** The reply being streamed: {replyId, inReplyTo, text, chunks}, or null. */
    this.currentReply = null;
    /** Reconnection attempts since the last successful start. */
    this.attempt = 0;

    this._listeners = new Map();
    this._outbox = new Map(); // clientId -> entry, in send order
    this._socket = null;
    this._generation = 0; // which socket events belong to
    this._reconnectTimer = null;
    this._heartbeatTimer = null;
    this._pongTimer = null;
    this._pings = new Map(); // ts -> {resolve, reject}
    this._closing = false; // close()/end() called: no reconnect
    this._connectWaiter = null; // {resolve, reject} of connect()
    this._unauthorizedInARow = 0;
    this._sawDurable = false;
  }

  // -- events ------------------------------------------------------------------

  /** Call `listener(payload)` on each event `type`; returns a function that unsubscribes. */
  on(type, listener) {
    let set = this._listeners.get(type);
    if (!set) this._listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => this.off(type, listener);
  }

  /** Stop calling `listener` on `type`. */
  off(type, listener) {
    this._listeners.get(type)?.delete(listener);
  }

  /** A promise of the next event `type` (optionally the next one `predicate` accepts). */
  once(type, predicate = () => true) {
    return new Promise((resolve) => {
      const off = this.on(type, (payload) => {
        if (!predicate(payload)) return;
        off();
        resolve(payload);
      });
    });
  }

  _emit(type, payload) {
    for (const listener of [...(this._listeners.get(type) ?? [])]) {
      try {
        listener(payload);
      } catch (error) {
        // A listener's bug must not break the connection; report it asynchronously.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }

  // -- connecting ----------------------------------------------------------------

  /**
   * Open the connection and start the session. Resolves with the `started` frame;
   * rejects with a SamvadError when the server refuses for good (auth, conflict)
   * or reconnection gives up. Later drops reconnect and resume on their own.
   */
  connect() {
    if (this.status !== Status.IDLE && this.status !== Status.CLOSED) {
      return Promise.reject(new Error(`Cannot connect a client that is "${this.status}".`));
    }
    this._closing = false;
    const waiter = {};
    const promise = new Promise((resolve, reject) => {
      waiter.resolve = resolve;
      waiter.reject = reject;
    });
    promise.catch(() => {});
    this._connectWaiter = waiter;
    this._open("connect");
    return promise;
  }

  _setStatus(status, detail = {}) {
    this.status = status;
    this._emit("status", { status, attempt: this.attempt, ...detail });
  }

  async _open(reason) {
    const generation = ++this._generation;
    this._setStatus(this.attempt === 0 && reason === "connect" ? Status.CONNECTING : Status.RECONNECTING, {
      reason,
    });
    let token = null;
    if (this.tokenProvider) {
      try {
        token = await this.tokenProvider({
          userId: this.userId,
          reason,
          forceRefresh: reason === "unauthorized",
        });
      } catch (error) {
        if (generation !== this._generation) return;
        this._emit("error", new SamvadError("token_unavailable", String(error?.message ?? error), { action: "reauthenticate" }));
        this._scheduleReconnect({ code: 4401, reason: "token provider failed" });
        return;
      }
    }
    if (generation !== this._generation || this._closing) return;
    let socket;
    try {
      socket = new this.WebSocketImpl(this.url);
    } catch (error) {
      this._fail(new SamvadError("bad_url", String(error?.message ?? error), { action: "fix_request" }));
      return;
    }
    this._socket = socket;
    socket.onopen = () => {
      if (generation !== this._generation) return;
      this._transmit(this._startFrame(token));
    };
    socket.onmessage = (event) => {
      if (generation !== this._generation) return;
      this._receive(event.data);
    };
    socket.onerror = () => {
      // A close event always follows; the decision is taken there.
    };
    socket.onclose = (event) => {
      if (generation !== this._generation) return;
      this._onClose(event.code, event.reason ?? "");
    };
  }

  _startFrame(token) {
    const frame = { type: "start", userId: this.userId };
    if (this.sessionId) frame.sessionId = this.sessionId;
    if (this.language) frame.language = this.language;
    if (this.metadata) frame.metadata = this.metadata;
    if (this.historyLimit !== null) frame.historyLimit = this.historyLimit;
    if (token) frame.token = token;
    if (this.sessionId && this.lastSeq !== null) frame.resume = { lastSeq: this.lastSeq };
    this._resuming = frame.resume !== undefined;
    this._resumeFrom = this.lastSeq;
    return frame;
  }

  _transmit(frame) {
    const socket = this._socket;
    if (!socket || socket.readyState !== 1) return false;
    socket.send(JSON.stringify(frame));
    return true;
  }

  // -- receiving -------------------------------------------------------------------

  _receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this._emit("error", new SamvadError("bad_server_frame", "The server sent invalid JSON.", { action: "ignore" }));
      return;
    }
    if (!frame || typeof frame.type !== "string") return;
    this._lastFrameAt = Date.now();
    if (this._pongTimer !== null) {
      // Any frame proves the connection alive.
      this.timers.clearTimeout(this._pongTimer);
      this._pongTimer = null;
    }
    switch (frame.type) {
      case "started":
        this._onStarted(frame);
        break;
      case "resume":
        // The replayed messages come before the reply still streaming: the
        // app sees `resume` first, then `reply.lost` / `reply.resumed`.
        for (const message of frame.recovered ? frame.messages ?? [] : []) this._seeSeq(message.seq);
        this._emit(frame.type, frame);
        this._emit("frame", frame);
        this._onResume(frame);
        return;
      case "ack":
        this._onAck(frame);
        break;
      case "reply.start":
        this.currentReply = { replyId: frame.replyId, inReplyTo: frame.inReplyTo, text: "", chunks: 0 };
        break;
      case "reply.chunk": {
        const reply = this.currentReply;
        if (reply && reply.replyId === frame.replyId) {
          // After a resume the server continues from inFlight.chunks: drop repeats.
          if (frame.index < reply.chunks) return;
          reply.text += frame.text;
          reply.chunks = frame.index + 1;
        }
        break;
      }
      case "reply.end":
        this._seeSeq(frame.seq);
        if (this.currentReply?.replyId === frame.replyId) this.currentReply = null;
        break;
      case "interrupted":
        if (!frame.late) this._seeSeq(frame.seq);
        if (this.currentReply?.replyId === frame.replyId) this.currentReply = null;
        break;
      case "message":
        if (frame.message?.sessionId === this.sessionId) this._seeSeq(frame.message.seq);
        break;
      case "pong": {
        const waiter = this._pings.get(String(frame.ts));
        if (waiter) {
          this._pings.delete(String(frame.ts));
          waiter.resolve(frame);
        }
        break;
      }
      case "durable":
        this._onDurable(frame);
        break;
      case "error":
        // Reported as a SamvadError under "error" (not the raw frame).
        this._emit("frame", frame);
        this._onError(frame);
        return;
      case "ended":
        this._closing = true;
        break;
      default:
        break;
    }
    this._emit(frame.type, frame);
    this._emit("frame", frame);
  }

  _seeSeq(seq) {
    if (typeof seq === "number" && (this.lastSeq === null || seq > this.lastSeq)) this.lastSeq = seq;
  }

  _onStarted(frame) {
    const previousSession = this.sessionId;
    this.started = frame;
    this.sessionId = frame.sessionId;
    this.mode = frame.mode;
    if (!this._resuming || previousSession !== frame.sessionId) {
      this.lastSeq = frame.lastSeq;
    }
    // Another session's durable seq says nothing of this one.
    if (previousSession !== frame.sessionId) this.durableSeq = 0;
    this.attempt = 0;
    this._unauthorizedInARow = 0;
    if (!this._resuming) {
      this._afterStart(null);
    }
    // With a resume, the session is usable once the `resume` frame arrived.
  }

  _onResume(frame) {
    const lostReply = this.currentReply;
    if (!frame.recovered) {
      // Missed messages are gone from the server's buffer: the app reloads from
      // started.history, which is where lastSeq restarts.
      this.lastSeq = frame.lastSeq;
      this._emit("resume.failed", { reason: frame.reason, history: this.started?.history ?? [] });
    }
    const inFlight = frame.inFlight;
    if (lostReply && (!inFlight || inFlight.replyId !== lostReply.replyId)) {
      // It finished (or was cut) while we were away: its stored form is among the replayed messages.
      this._emit("reply.lost", { replyId: lostReply.replyId });
    }
    if (inFlight) {
      this.currentReply = { ...inFlight };
      this._emit("reply.resumed", { ...inFlight });
    } else {
      this.currentReply = null;
    }
    this._afterStart(frame);
  }

  _afterStart(resumeFrame) {
    this._resuming = false;
    this._setStatus(Status.OPEN, { resumed: resumeFrame !== null, recovered: resumeFrame?.recovered ?? null });
    this._startHeartbeat();
    this._resendOutbox(resumeFrame);
    const waiter = this._connectWaiter;
    if (waiter) {
      this._connectWaiter = null;
      waiter.resolve(this.started);
    }
  }

  _onError(frame) {
    const error = new SamvadError(frame.code, frame.message ?? frame.code);
    const entry = ERROR_ACTIONS[frame.code];
    if (entry?.fatal && (frame.code === "conflict" || this.status !== Status.OPEN)) {
      // A refused start: no point in reconnecting with the same request.
      this._closing = true;
      this._fail(error);
      try {
        this._socket?.close(1000, "refused");
      } catch {
        // already closed
      }
      return;
    }
    this._emit("error", error);
  }

  // -- messages ---------------------------------------------------------------------

  /**
   * Send a chat message or final transcript. Returns `{clientId, ack}`: `ack`
   * resolves with the `ack` frame. Sent now when connected, else queued; kept
   * until acknowledged (or durable, see keepUntilDurable) and re-sent after a
   * reconnect if the server did not store it.
   */
  send(text, { clientId = newClientId(), final = true } = {}) {
    if (typeof text !== "string" || text.trim() === "") throw new TypeError("send() needs non-empty text");
    if (this.status === Status.CLOSED) throw new Error("Cannot send on a closed client.");
    if (!final) {
      // Interim transcripts are not stored or acknowledged: fire and forget.
      this._transmitWhenOpen({ type: "message", text, final: false });
      return { clientId, ack: Promise.resolve(null) };
    }
    const entry = { clientId, text, seq: null, messageId: null, acked: false, transmitted: false };
    entry.ack = new Promise((resolve, reject) => {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    entry.ack.catch(() => {});
    this._outbox.set(clientId, entry);
    if (this.status === Status.OPEN) this._transmitEntry(entry);
    return { clientId, ack: entry.ack };
  }

  _transmitEntry(entry) {
    entry.transmitted = this._transmit({ type: "message", text: entry.text, clientId: entry.clientId });
  }

  _transmitWhenOpen(frame) {
    return this.status === Status.OPEN && this._transmit(frame);
  }

  /** Messages not yet acknowledged (or not yet durable), oldest first. */
  get pending() {
    return [...this._outbox.values()].map(({ clientId, text, seq, acked }) => ({ clientId, text, seq, acked }));
  }

  get _keepingUntilDurable() {
    return this.keepUntilDurable === true || (this.keepUntilDurable === "auto" && this._sawDurable);
  }

  _onAck(frame) {
    this._seeSeq(frame.seq);
    const entry = frame.clientId ? this._outbox.get(frame.clientId) : undefined;
    if (!entry) return;
    this._settleAck(entry, frame);
  }

  _settleAck(entry, frame) {
    entry.acked = true;
    entry.seq = frame.seq;
    entry.messageId = frame.messageId;
    entry.resolve(frame);
    if (!this._keepingUntilDurable || (entry.seq !== null && entry.seq <= this.durableSeq)) {
      this._outbox.delete(entry.clientId);
    }
  }

  _onDurable(frame) {
    if (frame.sessionId && this.sessionId && frame.sessionId !== this.sessionId) return;
    this._sawDurable = true;
    if (typeof frame.seq === "number" && frame.seq > this.durableSeq) this.durableSeq = frame.seq;
    for (const entry of [...this._outbox.values()]) {
      if (entry.acked && entry.seq !== null && entry.seq <= this.durableSeq) this._outbox.delete(entry.clientId);
    }
  }

  /**
   * After (re)starting: re-send what the server may not have. A server that sends
   * `durable` frames also de-duplicates by clientId, so every kept message is
   * re-sent. Otherwise an unacknowledged message the resume replayed (same text,
   * a user message of this session, in order) counts as acknowledged, and only
   * the rest is re-sent.
   */
  _resendOutbox(resumeFrame) {
    let candidates = [];
    if (resumeFrame) {
      candidates = resumeFrame.recovered
        ? resumeFrame.messages ?? []
        : (this.started?.history ?? []).filter(
            (m) => m.sessionId === this.sessionId && typeof m.seq === "number" && m.seq > (this._resumeFrom ?? 0),
          );
    }
    const replayedUser = candidates.filter((m) => m.role === "user");
    let cursor = 0;
    for (const entry of [...this._outbox.values()]) {
      if (!this._keepingUntilDurable) {
        if (entry.acked) continue;
        if (entry.transmitted) {
          const index = replayedUser.findIndex((m, i) => i >= cursor && m.content === entry.text);
          if (index >= 0) {
            cursor = index + 1;
            const message = replayedUser[index];
            this._settleAck(entry, {
              type: "ack",
              seq: message.seq,
              messageId: message.id,
              clientId: entry.clientId,
              timestamp: message.timestamp,
              replayed: true,
            });
            continue;
          }
        }
      } else {
        // Its seq comes again with the new ack: a server that lost the message
        // numbers it anew, and a durable frame in the new numbering says nothing
        // of the old one.
        entry.seq = null;
      }
      this._transmitEntry(entry);
    }
  }

  /** Re-send every unacknowledged message now (after a `backlog_full` error, say). */
  resendPending() {
    if (this.status !== Status.OPEN) return;
    for (const entry of this._outbox.values()) if (!entry.acked) this._transmitEntry(entry);
  }

  /**
   * Barge in: cut the streaming reply, storing only what the user heard
   * (`heardChars` characters, or the common prefix with `heardText`).
   * Returns whether the frame went out.
   */
  interrupt({ heardChars, heardText, reason, replyId } = {}) {
    const frame = { type: "interrupt" };
    if (heardChars !== undefined && heardChars !== null) frame.heardChars = Math.max(0, Math.floor(heardChars));
    if (heardText !== undefined && heardText !== null) frame.heardText = heardText;
    if (reason) frame.reason = reason;
    if (replyId) frame.replyId = replyId;
    return this._transmitWhenOpen(frame);
  }

  /** Merge fields into the user's state (each top-level field replaced whole). */
  setState(state) {
    return this._transmitWhenOpen({ type: "state", state });
  }

  /** Send a heartbeat; resolves with the `pong` frame. */
  ping() {
    this._pingCount = (this._pingCount ?? 0) + 1;
    const ts = `${Date.now()}-${this._pingCount}`;
    return new Promise((resolve, reject) => {
      if (!this._transmitWhenOpen({ type: "ping", ts })) {
        reject(new Error("Not connected."));
        return;
      }
      this._pings.set(String(ts), { resolve, reject });
    });
  }

  _startHeartbeat() {
    this._stopHeartbeat();
    if (!this.heartbeatInterval) return;
    const beat = () => {
      this._heartbeatTimer = this.timers.setTimeout(beat, this.heartbeatInterval);
      if (this.status !== Status.OPEN) return;
      this.ping().catch(() => {});
      if (this._pongTimer === null && this.heartbeatTimeout) {
        // Browsers hide WebSocket pings: a pong (or any frame) proves the link alive.
        this._pongTimer = this.timers.setTimeout(() => {
          this._pongTimer = null;
          this.dropConnection("no heartbeat answer");
        }, this.heartbeatTimeout);
      }
    };
    this._heartbeatTimer = this.timers.setTimeout(beat, this.heartbeatInterval);
  }

  _stopHeartbeat() {
    if (this._heartbeatTimer !== null) this.timers.clearTimeout(this._heartbeatTimer);
    if (this._pongTimer !== null) this.timers.clearTimeout(this._pongTimer);
    this._heartbeatTimer = this._pongTimer = null;
    for (const waiter of this._pings.values()) waiter.reject(new Error("Connection closed."));
    this._pings.clear();
  }

  // -- closing and reconnecting ---------------------------------------------------------

  /**
   * Close the socket as a network loss would and reconnect (with resume) after
   * the backoff: for an app that knows the network changed, and for tests.
   */
  dropConnection(reason = "dropped by the client") {
    const socket = this._socket;
    if (!socket) return;
    this._generation++; // the old socket's events no longer count
    this._socket = null;
    try {
      socket.close(4000, reason);
    } catch {
      // already closing
    }
    this._onClose(4000, reason);
  }

  _onClose(code, reason) {
    this._socket = null;
    this._stopHeartbeat();
    if (this._closing || this.status === Status.CLOSED) {
      this._finish(code, reason);
      return;
    }
    this._scheduleReconnect({ code, reason });
  }

  _scheduleReconnect({ code, reason }) {
    const action = closeAction(code);
    let unauthorized = false;
    if (code === 4401) {
      this._unauthorizedInARow += 1;
      // A fresh token was already tried once: the user must sign in again.
      unauthorized = this._unauthorizedInARow <= 1;
    }
    const options = this.reconnectOptions;
    const giveUp =
      !action.reconnect ||
      options === null ||
      (code === 4401 && !unauthorized) ||
      this.attempt >= options.maxAttempts;
    if (giveUp) {
      const error = new SamvadError(`close_${code}`, action.description, { closeCode: code, action: action.action });
      this._fail(error, code, reason);
      return;
    }
    const delay = unauthorized ? 0 : this._backoff(this.attempt);
    this.attempt += 1;
    this._setStatus(Status.RECONNECTING, { closeCode: code, reason, delay, action: action.action });
    this._reconnectTimer = this.timers.setTimeout(() => {
      this._reconnectTimer = null;
      if (!this._closing) this._open(unauthorized ? "unauthorized" : "reconnect");
    }, delay);
  }

  /** The delay before reconnection attempt `attempt` (0-based), with jitter. */
  _backoff(attempt) {
    const { initialDelay, maxDelay, factor, jitter } = this.reconnectOptions;
    const base = Math.min(maxDelay, initialDelay * factor ** attempt);
    const spread = base * jitter * (2 * this.random() - 1);
    return Math.max(0, Math.round(base + spread));
  }

  /** Reconnect now instead of waiting for the backoff (e.g. the browser came back online). */
  reconnectNow() {
    if (this.status !== Status.RECONNECTING || this._reconnectTimer === null) return;
    this.timers.clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._open("reconnect");
  }

  _fail(error, code = error.closeCode, reason = error.message) {
    this._closing = true;
    if (this._reconnectTimer !== null) this.timers.clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    const waiter = this._connectWaiter;
    this._connectWaiter = null;
    if (waiter) waiter.reject(error);
    else this._emit("error", error);
    this._finish(code, reason, error);
  }

  _finish(code, reason, error = null) {
    if (this.status === Status.CLOSED) return;
    this._stopHeartbeat();
    this._setStatus(Status.CLOSED, { closeCode: code, reason });
    for (const entry of this._outbox.values()) {
      if (!entry.acked) entry.reject(error ?? new SamvadError(`close_${code}`, "The connection closed.", { closeCode: code }));
    }
    this._emit("close", { code, reason, action: closeAction(code).action, error });
    const waiter = this._connectWaiter;
    this._connectWaiter = null;
    if (waiter) waiter.reject(error ?? new SamvadError(`close_${code}`, reason, { closeCode: code }));
  }

  /**
   * End the session for every device (`end`); resolves once the server closed.
   * Unacknowledged messages are rejected.
   */
  async end() {
    this._closing = true;
    if (this.status !== Status.OPEN || !this._socket) {
      this.close();
      return;
    }
    const closed = this.once("close");
    this._transmit({ type: "end" });
    await closed;
  }

  /**
   * Close the connection without ending the session (the server ends it once
   * no device holds it; a later client may resume it). No reconnection follows.
   */
  close(code = 1000, reason = "client closed") {
    this._closing = true;
    if (this._reconnectTimer !== null) this.timers.clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    const socket = this._socket;
    if (socket && socket.readyState <= 1) {
      try {
        socket.close(code, reason);
      } catch {
        // already closed
      }
    } else {
      this._finish(code, reason);
    }
  }
}

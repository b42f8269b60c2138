// Types of Samvad's JavaScript client (samvad.js). The frames are those of
// docs/protocol.md; field names are camelCase, timestamps ISO-8601 UTC strings.

export declare const PROTOCOL_VERSION: 1;

export type ClientFrameType = "start" | "message" | "interrupt" | "state" | "ping" | "end";
export type ServerFrameType =
  | "started"
  | "resume"
  | "ack"
  | "reply.start"
  | "reply.chunk"
  | "reply.end"
  | "interrupted"
  | "message"
  | "state"
  | "pong"
  | "error"
  | "ended"
  | "durable";

export declare const CLIENT_FRAME_TYPES: readonly ClientFrameType[];
export declare const SERVER_FRAME_TYPES: readonly ServerFrameType[];

export type JsonObject = { [key: string]: unknown };

/** A stored message, as history, resume and `message` frames carry it. */
export interface HistoryMessage {
  id: string;
  role: "user" | "assistant";
  content: string;
  timestamp: string;
  sessionId?: string;
  interrupted?: boolean;
  seq?: number;
}

export interface Limits {
  maxFrameBytes: number;
  ratePerSecond: number;
  rateBurst: number;
  idleTimeoutSeconds: number;
  resumeWindow: number;
}

export interface StartedFrame {
  type: "started";
  protocol: number;
  sessionId: string;
  userId: string;
  mode: "firestore" | "memory";
  state: JsonObject;
  history: HistoryMessage[];
  lastSeq: number;
  resumed: boolean;
  limits: Limits;
  /** True when Firestore could not be read: `state` and `history` may lack data. */
  historyIncomplete: boolean;
}

export interface InFlightReply {
  replyId: string;
  inReplyTo: number | null;
  text: string;
  chunks: number;
}

export type ResumeFailure = "history_trimmed" | "unknown_seq" | "too_many_missed";

export interface ResumeFrame {
  type: "resume";
  recovered: boolean;
  lastSeq: number;
  messages?: HistoryMessage[];
  reason?: ResumeFailure;
  inFlight: InFlightReply | null;
}

export interface AckFrame {
  type: "ack";
  seq: number;
  messageId: string;
  clientId: string | null;
  timestamp: string;
  /** With the zero-loss protocol: this clientId was stored before (a re-send). */
  duplicate?: boolean;
  /** Set by the client when a resume showed the message stored (its ack was lost). */
  replayed?: boolean;
}

export interface ReplyStartFrame {
  type: "reply.start";
  replyId: string;
  inReplyTo: number | null;
}

export interface ReplyChunkFrame {
  type: "reply.chunk";
  replyId: string;
  index: number;
  text: string;
}

export interface ReplyEndFrame {
  type: "reply.end";
  replyId: string;
  seq: number | null;
  messageId: string | null;
  text: string;
  complete: boolean;
}

export interface InterruptedFrame {
  type: "interrupted";
  replyId: string;
  heard: string;
  seq: number | null;
  messageId: string | null;
  reason: string;
  late: boolean;
}

export interface MessageFrame {
  type: "message";
  message: HistoryMessage;
}

export interface StateFrame {
  type: "state";
  state: JsonObject;
}

export interface PongFrame {
  type: "pong";
  ts: string | number | null;
  serverTime: string;
}

export type ErrorCode =
  | "bad_json"
  | "bad_frame"
  | "unknown_type"
  | "invalid_field"
  | "not_started"
  | "already_started"
  | "session_ended"
  | "conflict"
  | "nothing_to_interrupt"
  | "payload_too_large"
  | "backlog_full"
  | "auth_unavailable"
  | "rate_limited"
  | "frame_too_large"
  | "unauthorized"
  | "forbidden"
  | "idle_timeout"
  | "start_timeout"
  | "internal_error";

export interface ErrorFrame {
  type: "error";
  code: ErrorCode;
  message: string;
}

export interface EndedFrame {
  type: "ended";
  sessionId: string;
}

/** With the zero-loss protocol: every message of the session with seq ≤ `seq` is in Firestore. */
export interface DurableFrame {
  type: "durable";
  sessionId: string;
  seq: number;
}

export type ServerFrame =
  | StartedFrame
  | ResumeFrame
  | AckFrame
  | ReplyStartFrame
  | ReplyChunkFrame
  | ReplyEndFrame
  | InterruptedFrame
  | MessageFrame
  | StateFrame
  | PongFrame
  | ErrorFrame
  | EndedFrame
  | DurableFrame;

/** What an app should do about an error or a close. */
export type Action =
  | "fix_request"
  | "ignore"
  | "retry"
  | "slow_down"
  | "choose_session"
  | "reauthenticate"
  | "sign_out"
  | "new_session"
  | "reconnect";

export interface ErrorActionEntry {
  action: Action;
  /** The client stops (no reconnection) when a start is refused with this code. */
  fatal: boolean;
  description: string;
}

export interface CloseActionEntry {
  /** Whether the client reconnects (and resumes) after this close code. */
  reconnect: boolean;
  action: Action;
  description: string;
}

export declare const ERROR_ACTIONS: Readonly<Record<ErrorCode, ErrorActionEntry>>;
export declare const CLOSE_ACTIONS: Readonly<Record<number, CloseActionEntry>>;
export declare function errorAction(code: string): ErrorActionEntry;
export declare function closeAction(code: number): CloseActionEntry;

export declare class SamvadError extends Error {
  constructor(code: string, message: string, options?: { closeCode?: number | null; action?: Action | null });
  /** An `error` frame code, `close_<code>`, `token_unavailable` or `bad_url`. */
  readonly code: string;
  readonly closeCode: number | null;
  readonly action: Action;
}

export type StatusValue = "idle" | "connecting" | "open" | "reconnecting" | "closed";
export declare const Status: Readonly<{
  IDLE: "idle";
  CONNECTING: "connecting";
  OPEN: "open";
  RECONNECTING: "reconnecting";
  CLOSED: "closed";
}>;

export interface StatusEvent {
  status: StatusValue;
  attempt: number;
  reason?: string;
  closeCode?: number;
  /** Milliseconds until the next attempt (status "reconnecting"). */
  delay?: number;
  action?: Action;
  resumed?: boolean;
  recovered?: boolean | null;
}

export interface CloseEvent {
  code: number | null;
  reason: string;
  action: Action;
  error: SamvadError | null;
}

export interface TokenRequest {
  userId: string;
  reason: "connect" | "reconnect" | "unauthorized";
  /** True after the server refused the last token (4401): do not return a cached one. */
  forceRefresh: boolean;
}

/** Called before every (re)connection; e.g. `() => auth.currentUser.getIdToken()`. */
export type TokenProvider = (request: TokenRequest) => string | null | Promise<string | null>;

export interface ReconnectOptions {
  /** First delay in ms (default 250). */
  initialDelay?: number;
  /** Longest delay in ms (default 15000). */
  maxDelay?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** ± fraction of random spread (default 0.25). */
  jitter?: number;
  /** Attempts before giving up (default: never). */
  maxAttempts?: number;
}

export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
}

export interface SamvadClientOptions {
  /** `ws://HOST:PORT/ws` or `wss://…/ws`. */
  url: string;
  userId: string;
  /** Join or resume this session; without it the server makes one. */
  sessionId?: string | null;
  /** With sessionId: resume from this sequence number (e.g. kept across a page reload). */
  lastSeq?: number | null;
  language?: string | null;
  metadata?: JsonObject | null;
  /** History messages in `started` (0–100; server default 20). */
  historyLimit?: number | null;
  token?: TokenProvider | null;
  /** Milliseconds between pings (default 25000; 0 disables). */
  heartbeatInterval?: number;
  /** Milliseconds without any frame after a ping before the link counts as dead (default 10000). */
  heartbeatTimeout?: number;
  /** Backoff settings, or false for no reconnection. */
  reconnect?: ReconnectOptions | false;
  /**
   * Keep messages until the server reports them durable and re-send them with
   * their clientId after a reconnect: "auto" (default) once the server sent a
   * `durable` frame; true; or false (kept until acknowledged).
   */
  keepUntilDurable?: boolean | "auto";
  /** A WebSocket constructor (default: globalThis.WebSocket). */
  WebSocket?: new (url: string) => WebSocketLike;
  timers?: {
    setTimeout?: (callback: () => void, ms: number) => unknown;
    clearTimeout?: (handle: unknown) => void;
  };
  /** Random numbers in [0, 1) for the backoff jitter (default Math.random). */
  random?: () => number;
}

export interface SentMessage {
  clientId: string;
  /** Resolves with the ack (null for interim transcripts); rejects if the client closes first. */
  ack: Promise<AckFrame | null>;
}

export interface PendingMessage {
  clientId: string;
  text: string;
  seq: number | null;
  acked: boolean;
}

export interface ClientEvents {
  status: StatusEvent;
  frame: ServerFrame;
  started: StartedFrame;
  resume: ResumeFrame;
  ack: AckFrame;
  "reply.start": ReplyStartFrame;
  "reply.chunk": ReplyChunkFrame;
  "reply.end": ReplyEndFrame;
  interrupted: InterruptedFrame;
  message: MessageFrame;
  state: StateFrame;
  pong: PongFrame;
  ended: EndedFrame;
  durable: DurableFrame;
  /** The reply still streaming when the connection dropped: its text so far. */
  "reply.resumed": InFlightReply;
  /** A reply that was streaming when the connection dropped and finished meanwhile. */
  "reply.lost": { replyId: string };
  /** Missed messages could not be replayed: reload the conversation from `history`. */
  "resume.failed": { reason: ResumeFailure; history: HistoryMessage[] };
  error: SamvadError;
  close: CloseEvent;
}

export declare class SamvadClient {
  constructor(options: SamvadClientOptions);
  readonly url: string;
  readonly userId: string;
  readonly sessionId: string | null;
  readonly status: StatusValue;
  readonly lastSeq: number | null;
  readonly durableSeq: number;
  readonly started: StartedFrame | null;
  readonly mode: "firestore" | "memory" | null;
  readonly currentReply: InFlightReply | null;
  readonly attempt: number;
  readonly pending: PendingMessage[];

  on<K extends keyof ClientEvents>(type: K, listener: (event: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(type: K, listener: (event: ClientEvents[K]) => void): void;
  once<K extends keyof ClientEvents>(
    type: K,
    predicate?: (event: ClientEvents[K]) => boolean,
  ): Promise<ClientEvents[K]>;

  connect(): Promise<StartedFrame>;
  send(text: string, options?: { clientId?: string; final?: boolean }): SentMessage;
  resendPending(): void;
  interrupt(options?: { heardChars?: number; heardText?: string; reason?: string; replyId?: string }): boolean;
  setState(state: JsonObject): boolean;
  ping(): Promise<PongFrame>;
  dropConnection(reason?: string): void;
  reconnectNow(): void;
  end(): Promise<void>;
  close(code?: number, reason?: string): void;
}

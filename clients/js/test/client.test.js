// Unit tests of samvad.js against a scripted WebSocket and manual timers
// (the demo page's Chromium tests run the same client against a real server).
import assert from "node:assert/strict";
import { beforeEach, test } from "node:test";

import {
  CLOSE_ACTIONS,
  ERROR_ACTIONS,
  SamvadClient,
  SamvadError,
  Status,
  closeAction,
  errorAction,
} from "../samvad.js";
import { FakeSocket, ManualTimers, settle, startedFrame } from "../testing/fakes.js";

let timers;

beforeEach(() => {
  FakeSocket.reset();
  timers = new ManualTimers();
});

function makeClient(options = {}) {
  return new SamvadClient({
    url: "ws://samvad.test/ws",
    userId: "u1",
    WebSocket: FakeSocket,
    timers,
    random: () => 0.5, // no jitter: 2 * 0.5 - 1 = 0
    heartbeatInterval: 0,
    ...options,
  });
}

/** Connect `client` through a fresh socket answered with `started` (plus overrides). */
async function connected(client, started = {}) {
  const promise = client.connect();
  await settle();
  FakeSocket.last.open();
  FakeSocket.last.deliver(startedFrame(started));
  return promise;
}

/** Let the scheduled reconnection run, open its socket; the `start` frame it sent. */
async function reconnect() {
  timers.advance(timers.delays[0] ?? 0);
  await settle();
  const socket = FakeSocket.last;
  socket.open();
  return socket.sentOfType("start").at(-1);
}

test("connect sends start with the token and resolves with started", async () => {
  const requests = [];
  const client = makeClient({
    sessionId: "s1",
    language: "en",
    historyLimit: 5,
    token: (request) => {
      requests.push(request);
      return "token-1";
    },
  });
  const started = await connected(client, { lastSeq: 7 });
  assert.equal(started.sessionId, "s1");
  assert.deepEqual(FakeSocket.last.sent[0], {
    type: "start",
    userId: "u1",
    sessionId: "s1",
    language: "en",
    historyLimit: 5,
    token: "token-1",
  });
  assert.deepEqual(requests, [{ userId: "u1", reason: "connect", forceRefresh: false }]);
  assert.equal(client.status, Status.OPEN);
  assert.equal(client.lastSeq, 7);
  assert.equal(client.mode, "memory");
});

test("messages sent before the start are queued, then sent with a clientId and acknowledged", async () => {
  const client = makeClient();
  const { clientId, ack } = client.send("hello");
  assert.equal(client.pending.length, 1);
  await connected(client);
  const [message] = FakeSocket.last.sentOfType("message");
  assert.deepEqual(message, { type: "message", text: "hello", clientId });
  FakeSocket.last.deliver({ type: "ack", seq: 1, messageId: "m1", clientId, timestamp: "t" });
  assert.equal((await ack).seq, 1);
  assert.equal(client.lastSeq, 1);
  assert.deepEqual(client.pending, []);
  assert.throws(() => client.send("   "), TypeError);
});

test("sequence numbers follow acks, reply ends, interruptions and this session's messages", async () => {
  const client = makeClient();
  await connected(client, { sessionId: "s1" });
  const socket = FakeSocket.last;
  socket.deliver({ type: "reply.end", replyId: "r", seq: 3, messageId: "m", text: "x", complete: true });
  assert.equal(client.lastSeq, 3);
  socket.deliver({ type: "interrupted", replyId: "r", heard: "", seq: 9, messageId: "m", reason: "x", late: true });
  assert.equal(client.lastSeq, 3, "a late interruption stores nothing new");
  socket.deliver({ type: "message", message: { id: "a", role: "user", content: "c", timestamp: "t", sessionId: "other", seq: 50 } });
  assert.equal(client.lastSeq, 3, "another session's numbers are not ours");
  socket.deliver({ type: "message", message: { id: "b", role: "user", content: "c", timestamp: "t", sessionId: "s1", seq: 4 } });
  assert.equal(client.lastSeq, 4);
});

test("a dropped connection reconnects with backoff and resumes from lastSeq", async () => {
  let tokens = 0;
  const client = makeClient({ token: () => `token-${++tokens}` });
  await connected(client, { sessionId: "s1", lastSeq: 2 });
  const statuses = [];
  client.on("status", (event) => statuses.push(event));
  FakeSocket.last.serverClose(1006);
  assert.equal(client.status, Status.RECONNECTING);
  assert.deepEqual(timers.delays, [250]);
  const start = await reconnect();
  assert.deepEqual(start, { type: "start", userId: "u1", sessionId: "s1", token: "token-2", resume: { lastSeq: 2 } });
  FakeSocket.last.deliver(startedFrame({ lastSeq: 4, resumed: true }));
  assert.equal(client.status, Status.RECONNECTING, "usable only once the resume frame came");
  const replayed = [];
  client.on("resume", (frame) => replayed.push(...frame.messages));
  FakeSocket.last.deliver({
    type: "resume",
    recovered: true,
    lastSeq: 4,
    messages: [
      { id: "m3", role: "user", content: "a", timestamp: "t", sessionId: "s1", seq: 3 },
      { id: "m4", role: "assistant", content: "b", timestamp: "t", sessionId: "s1", seq: 4 },
    ],
    inFlight: null,
  });
  assert.equal(client.status, Status.OPEN);
  assert.equal(client.lastSeq, 4);
  assert.deepEqual(replayed.map((m) => m.seq), [3, 4]);
  assert.equal(client.attempt, 0);
  assert.deepEqual(
    statuses.map((s) => s.status),
    [Status.RECONNECTING, Status.RECONNECTING, Status.OPEN],
  );
  assert.equal(statuses[0].closeCode, 1006);
});

test("backoff doubles up to the cap, with jitter, and gives up after maxAttempts", async () => {
  let random = 0.5;
  const client = makeClient({
    random: () => random,
    reconnect: { initialDelay: 100, maxDelay: 500, factor: 2, jitter: 0.5, maxAttempts: 5 },
  });
  await connected(client);
  const delays = [];
  FakeSocket.last.serverClose(1011);
  for (let i = 0; i < 5; i++) {
    delays.push(timers.delays[0]);
    timers.advance(timers.delays[0]);
    await settle();
    FakeSocket.last.serverClose(1006); // the server is still down
  }
  assert.deepEqual(delays, [100, 200, 400, 500, 500]);
  assert.equal(client.status, Status.CLOSED);
  random = 0; // the largest negative spread
  assert.equal(client._backoff(1), 100);
  random = 0.999999;
  assert.equal(client._backoff(0), 150);
});

test("the close after giving up carries the action", async () => {
  const client = makeClient({ reconnect: false });
  await connected(client);
  const closed = client.once("close");
  FakeSocket.last.serverClose(1001, "server shutting down");
  const event = await closed;
  assert.equal(event.code, 1001);
  assert.equal(event.action, "reconnect");
  assert.equal(client.status, Status.CLOSED);
});

test("unacknowledged messages the resume replayed are not sent again; the others are", async () => {
  const client = makeClient();
  await connected(client, { sessionId: "s1", lastSeq: 0 });
  const stored = client.send("stored before the drop");
  const lost = client.send("never reached the server");
  FakeSocket.last.serverClose(1006);
  await reconnect();
  FakeSocket.last.deliver(startedFrame({ lastSeq: 2, resumed: true }));
  FakeSocket.last.deliver({
    type: "resume",
    recovered: true,
    lastSeq: 2,
    messages: [
      { id: "m1", role: "user", content: "stored before the drop", timestamp: "t", sessionId: "s1", seq: 1 },
      { id: "m2", role: "assistant", content: "reply", timestamp: "t", sessionId: "s1", seq: 2 },
    ],
    inFlight: null,
  });
  const ack = await stored.ack;
  assert.equal(ack.seq, 1);
  assert.equal(ack.replayed, true);
  const resent = FakeSocket.last.sentOfType("message");
  assert.deepEqual(resent, [{ type: "message", text: "never reached the server", clientId: lost.clientId }]);
  FakeSocket.last.deliver({ type: "ack", seq: 3, messageId: "m3", clientId: lost.clientId, timestamp: "t" });
  assert.equal((await lost.ack).seq, 3);
});

test("a reply streaming across a drop resumes from its text so far, without repeated chunks", async () => {
  const client = makeClient();
  await connected(client, { sessionId: "s1", lastSeq: 1 });
  const socket = FakeSocket.last;
  socket.deliver({ type: "reply.start", replyId: "r1", inReplyTo: 1 });
  socket.deliver({ type: "reply.chunk", replyId: "r1", index: 0, text: "You " });
  socket.serverClose(1006);
  const resumed = client.once("reply.resumed");
  await reconnect();
  FakeSocket.last.deliver(startedFrame({ lastSeq: 1, resumed: true }));
  FakeSocket.last.deliver({
    type: "resume",
    recovered: true,
    lastSeq: 1,
    messages: [],
    inFlight: { replyId: "r1", inReplyTo: 1, text: "You said: ", chunks: 2 },
  });
  assert.equal((await resumed).text, "You said: ");
  const chunks = [];
  client.on("reply.chunk", (frame) => chunks.push(frame.index));
  FakeSocket.last.deliver({ type: "reply.chunk", replyId: "r1", index: 1, text: "said: " }); // a repeat
  FakeSocket.last.deliver({ type: "reply.chunk", replyId: "r1", index: 2, text: "hi" });
  assert.deepEqual(chunks, [2]);
  assert.equal(client.currentReply.text, "You said: hi");
});

test("a reply that finished during the drop is reported lost; its stored form is replayed", async () => {
  const client = makeClient();
  await connected(client, { sessionId: "s1", lastSeq: 1 });
  FakeSocket.last.deliver({ type: "reply.start", replyId: "r1", inReplyTo: 1 });
  FakeSocket.last.serverClose(1006);
  const order = [];
  client.on("resume", () => order.push("resume"));
  client.on("reply.lost", (event) => order.push(`lost ${event.replyId}`));
  await reconnect();
  FakeSocket.last.deliver(startedFrame({ lastSeq: 2, resumed: true }));
  FakeSocket.last.deliver({
    type: "resume",
    recovered: true,
    lastSeq: 2,
    messages: [{ id: "m2", role: "assistant", content: "done", timestamp: "t", sessionId: "s1", seq: 2 }],
    inFlight: null,
  });
  assert.deepEqual(order, ["resume", "lost r1"]);
  assert.equal(client.currentReply, null);
});

test("a resume that cannot recover reports it with the history to reload", async () => {
  const client = makeClient();
  await connected(client, { sessionId: "s1", lastSeq: 5 });
  FakeSocket.last.serverClose(1006);
  const failed = client.once("resume.failed");
  await reconnect();
  const history = [{ id: "m9", role: "user", content: "x", timestamp: "t", sessionId: "s1", seq: 300 }];
  FakeSocket.last.deliver(startedFrame({ lastSeq: 300, resumed: true, history }));
  FakeSocket.last.deliver({ type: "resume", recovered: false, lastSeq: 300, reason: "too_many_missed", inFlight: null });
  const event = await failed;
  assert.equal(event.reason, "too_many_missed");
  assert.deepEqual(event.history, history);
  assert.equal(client.lastSeq, 300);
  assert.equal(client.status, Status.OPEN);
});

test("an unauthorized close gets one fresh token, then the client stops", async () => {
  const requests = [];
  const client = makeClient({ token: (request) => (requests.push(request), "t") });
  await connected(client);
  FakeSocket.last.deliver({ type: "error", code: "unauthorized", message: "expired" });
  FakeSocket.last.serverClose(4401);
  assert.deepEqual(timers.delays, [0], "a fresh token is fetched at once");
  await reconnect();
  assert.deepEqual(requests.at(-1), { userId: "u1", reason: "unauthorized", forceRefresh: true });
  const closed = client.once("close");
  FakeSocket.last.deliver({ type: "error", code: "unauthorized", message: "still bad" });
  FakeSocket.last.serverClose(4401);
  const event = await closed;
  assert.equal(event.action, "reauthenticate");
  assert.equal(event.error.closeCode, 4401);
  assert.equal(client.status, Status.CLOSED);
  assert.equal(timers.pending.size, 0);
});

test("a start refused as forbidden rejects connect and does not reconnect", async () => {
  const client = makeClient({ token: () => "someone-elses-token" });
  const promise = client.connect();
  await settle();
  FakeSocket.last.open();
  FakeSocket.last.deliver({ type: "error", code: "forbidden", message: "another user" });
  FakeSocket.last.serverClose(4403);
  await assert.rejects(promise, (error) => error instanceof SamvadError && error.code === "forbidden" && error.action === "sign_out");
  assert.equal(client.status, Status.CLOSED);
  assert.equal(FakeSocket.instances.length, 1);
  assert.equal(timers.pending.size, 0);
});

test("a session of another user rejects connect with choose_session", async () => {
  const client = makeClient({ sessionId: "theirs" });
  const promise = client.connect();
  await settle();
  FakeSocket.last.open();
  FakeSocket.last.deliver({ type: "error", code: "conflict", message: "another user's session" });
  await assert.rejects(promise, (error) => error.code === "conflict" && error.action === "choose_session");
  assert.equal(FakeSocket.last.closedWith.code, 1000);
  assert.equal(timers.pending.size, 0);
});

test("errors that leave the connection usable are reported with their action", async () => {
  const client = makeClient();
  await connected(client);
  const errors = [];
  client.on("error", (error) => errors.push([error.code, error.action]));
  FakeSocket.last.deliver({ type: "error", code: "backlog_full", message: "retry" });
  FakeSocket.last.deliver({ type: "error", code: "rate_limited", message: "slow down" });
  FakeSocket.last.deliver({ type: "error", code: "nothing_to_interrupt", message: "none" });
  assert.deepEqual(errors, [
    ["backlog_full", "retry"],
    ["rate_limited", "slow_down"],
    ["nothing_to_interrupt", "ignore"],
  ]);
  assert.equal(client.status, Status.OPEN);
});

test("the session ending closes the client for good and rejects what was not acknowledged", async () => {
  const client = makeClient();
  await connected(client);
  const { ack } = client.send("too late");
  const ending = client.end();
  assert.deepEqual(FakeSocket.last.sent.at(-1), { type: "end" });
  FakeSocket.last.deliver({ type: "ended", sessionId: "s1" });
  FakeSocket.last.serverClose(1000, "session ended");
  await ending;
  await assert.rejects(ack, SamvadError);
  assert.equal(client.status, Status.CLOSED);
  assert.equal(timers.pending.size, 0);
});

test("another device ending the session closes without reconnecting", async () => {
  const client = makeClient();
  await connected(client);
  const closed = client.once("close");
  FakeSocket.last.deliver({ type: "ended", sessionId: "s1" });
  FakeSocket.last.serverClose(1000);
  assert.equal((await closed).action, "new_session");
  assert.equal(timers.pending.size, 0);
});

test("heartbeats: a ping every interval, and a link silent after one is dropped and resumed", async () => {
  const client = makeClient({ heartbeatInterval: 1000, heartbeatTimeout: 300 });
  await connected(client, { sessionId: "s1", lastSeq: 2 });
  const first = FakeSocket.last;
  timers.advance(1000);
  const [ping] = first.sentOfType("ping");
  assert.ok(ping, "a ping went out");
  first.deliver({ type: "pong", ts: ping.ts, serverTime: "t" });
  timers.advance(1000);
  assert.equal(first.sentOfType("ping").length, 2);
  timers.advance(300); // no answer to the second ping
  assert.equal(first.closedWith.code, 4000);
  assert.equal(client.status, Status.RECONNECTING);
  const start = await reconnect();
  assert.deepEqual(start.resume, { lastSeq: 2 });
});

test("ping resolves with its pong", async () => {
  const client = makeClient();
  await connected(client);
  const pong = client.ping();
  const [ping] = FakeSocket.last.sentOfType("ping");
  FakeSocket.last.deliver({ type: "pong", ts: ping.ts, serverTime: "2025-01-10T17:00:00.000Z" });
  assert.equal((await pong).serverTime, "2025-01-10T17:00:00.000Z");
});

test("interrupt sends what was heard; state and interim transcripts go out as frames", async () => {
  const client = makeClient();
  assert.equal(client.interrupt({ heardChars: 3 }), false, "nothing goes out before the start");
  await connected(client);
  assert.equal(client.interrupt({ heardChars: 12.7, replyId: "r1" }), true);
  client.interrupt({ heardText: "You said", reason: "typed" });
  client.setState({ topic: "loans" });
  const interim = client.send("what do", { final: false });
  assert.equal(await interim.ack, null);
  assert.deepEqual(FakeSocket.last.sent.slice(1), [
    { type: "interrupt", heardChars: 12, replyId: "r1" },
    { type: "interrupt", heardText: "You said", reason: "typed" },
    { type: "state", state: { topic: "loans" } },
    { type: "message", text: "what do", final: false },
  ]);
  assert.deepEqual(client.pending, []);
});

test("with durable frames, messages are kept until durable and re-sent with their clientId", async () => {
  const client = makeClient();
  await connected(client, { sessionId: "s1" });
  const durableEvents = [];
  client.on("durable", (frame) => durableEvents.push(frame.seq));
  FakeSocket.last.deliver({ type: "durable", sessionId: "s1", seq: 0 }); // the server speaks durability
  const a = client.send("a");
  const b = client.send("b");
  FakeSocket.last.deliver({ type: "ack", seq: 1, messageId: "m1", clientId: a.clientId, timestamp: "t" });
  FakeSocket.last.deliver({ type: "ack", seq: 2, messageId: "m2", clientId: b.clientId, timestamp: "t" });
  FakeSocket.last.deliver({ type: "durable", sessionId: "s1", seq: 1 });
  assert.deepEqual(client.pending.map((m) => m.clientId), [b.clientId]);
  assert.equal(client.durableSeq, 1);
  FakeSocket.last.deliver({ type: "durable", sessionId: "other", seq: 9 });
  assert.equal(client.durableSeq, 1, "another session's durability is not ours");
  FakeSocket.last.serverClose(1006);
  await reconnect();
  FakeSocket.last.deliver(startedFrame({ lastSeq: 2, resumed: true }));
  FakeSocket.last.deliver({ type: "resume", recovered: true, lastSeq: 2, messages: [], inFlight: null });
  assert.deepEqual(FakeSocket.last.sentOfType("message"), [{ type: "message", text: "b", clientId: b.clientId }]);
  FakeSocket.last.deliver({ type: "ack", seq: 2, messageId: "m2", clientId: b.clientId, timestamp: "t", duplicate: true });
  FakeSocket.last.deliver({ type: "durable", sessionId: "s1", seq: 2 });
  assert.deepEqual(client.pending, []);
  assert.deepEqual(durableEvents, [0, 1, 9, 2]);
});

test("frames of a replaced socket are ignored", async () => {
  const client = makeClient();
  await connected(client, { sessionId: "s1", lastSeq: 1 });
  const old = FakeSocket.last;
  client.dropConnection();
  old.deliver({ type: "ack", seq: 99, messageId: "x", clientId: null, timestamp: "t" });
  old.serverClose(1006);
  assert.equal(client.lastSeq, 1);
  assert.deepEqual(timers.delays, [250], "one reconnection, not two");
});

test("a token provider that fails is reported and retried with backoff", async () => {
  let calls = 0;
  const client = makeClient({
    token: () => {
      calls += 1;
      if (calls === 1) throw new Error("offline");
      return "t";
    },
  });
  const errors = [];
  client.on("error", (error) => errors.push(error.code));
  const promise = client.connect();
  await settle();
  assert.deepEqual(errors, ["token_unavailable"]);
  assert.equal(FakeSocket.instances.length, 0);
  timers.advance(0);
  await settle();
  FakeSocket.last.open();
  assert.equal(FakeSocket.last.sent[0].token, "t");
  FakeSocket.last.deliver(startedFrame());
  await promise;
});

test("every error code and close code has an action", () => {
  for (const [code, entry] of Object.entries(ERROR_ACTIONS)) {
    assert.equal(errorAction(code), entry);
    assert.equal(typeof entry.action, "string");
  }
  for (const [code, entry] of Object.entries(CLOSE_ACTIONS)) {
    assert.equal(closeAction(Number(code)), entry);
  }
  assert.equal(errorAction("something_new").action, "retry");
  assert.equal(closeAction(4999).reconnect, true);
  assert.equal(closeAction(1000).reconnect, false);
  assert.equal(closeAction(4403).reconnect, false);
});

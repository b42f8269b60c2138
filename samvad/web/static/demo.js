// Samvad's demo page: chat with streamed replies, and a voice mode (Web Speech API
// in where the browser has it, speechSynthesis out) with barge-in that stores only
// what the user heard. It uses the JavaScript client (samvad.js) and nothing else:
// no build step, nothing loaded from the internet. Test hooks: window.samvadDemo.

import { SamvadClient, Status } from "./samvad.js";

const $ = (selector) => document.querySelector(selector);
const params = new URLSearchParams(location.search);
const USER_KEY = "samvad-demo-user";
const SESSION_KEY = "samvad-demo-session";
const FIREBASE_KEY = "samvad-demo-firebase";

// -- signing in ----------------------------------------------------------------------

/** Anonymous Firebase sign-in through the Auth REST API (no SDK download). */
class AnonymousFirebaseUser {
  constructor(config) {
    this.apiKey = config.apiKey;
    const host = config.authEmulatorHost;
    this.identity = host
      ? `http://${host}/identitytoolkit.googleapis.com/v1`
      : "https://identitytoolkit.googleapis.com/v1";
    this.secureToken = host ? `http://${host}/securetoken.googleapis.com/v1` : "https://securetoken.googleapis.com/v1";
    this.saved = JSON.parse(localStorage.getItem(FIREBASE_KEY) ?? "null");
  }

  get uid() {
    return this.saved?.uid ?? null;
  }

  async signIn() {
    if (this.saved) return this.saved.uid;
    const response = await fetch(`${this.identity}/accounts:signUp?key=${encodeURIComponent(this.apiKey)}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ returnSecureToken: true }),
    });
    if (!response.ok) throw new Error(`anonymous sign-in failed (${response.status})`);
    const body = await response.json();
    this._save(body.localId, body.idToken, body.refreshToken, Number(body.expiresIn));
    return this.saved.uid;
  }

  /** The token provider of SamvadClient: a fresh ID token when needed or asked for. */
  async token({ forceRefresh }) {
    const saved = this.saved;
    if (!forceRefresh && saved.expiresAt - Date.now() > 60_000) return saved.idToken;
    const response = await fetch(`${this.secureToken}/token?key=${encodeURIComponent(this.apiKey)}`, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ grant_type: "refresh_token", refresh_token: saved.refreshToken }),
    });
    if (!response.ok) throw new Error(`token refresh failed (${response.status})`);
    const body = await response.json();
    this._save(body.user_id, body.id_token, body.refresh_token, Number(body.expires_in));
    return this.saved.idToken;
  }

  _save(uid, idToken, refreshToken, expiresIn) {
    this.saved = { uid, idToken, refreshToken, expiresAt: Date.now() + expiresIn * 1000 };
    localStorage.setItem(FIREBASE_KEY, JSON.stringify(this.saved));
  }
}

function localUserId() {
  const fromUrl = params.get("user");
  if (fromUrl) return fromUrl;
  let id = localStorage.getItem(USER_KEY);
  if (!id) {
    id = `demo-${crypto.randomUUID().slice(0, 8)}`;
    localStorage.setItem(USER_KEY, id);
  }
  return id;
}

// -- the transcript --------------------------------------------------------------------

/** What the page shows: one entry per message, keyed by seq once stored (no duplicates). */
class Transcript {
  constructor(list) {
    this.list = list;
    this.entries = [];
    this.durableSeq = 0;
    this.sessionId = null;
  }

  clear() {
    this.entries = [];
    this.list.replaceChildren();
  }

  bySeq(seq) {
    return this.entries.find((e) => e.seq === seq && e.sessionId === this.sessionId);
  }

  byReply(replyId) {
    return this.entries.find((e) => e.replyId === replyId);
  }

  byClientId(clientId) {
    return this.entries.find((e) => e.clientId === clientId);
  }

  /** Add a stored message (history, resume, other device) unless it is shown already. */
  addStored(message, { fromHistory = false } = {}) {
    if (typeof message.seq === "number" && message.sessionId === this.sessionId && this.bySeq(message.seq)) return;
    const entry = {
      role: message.role,
      text: message.content,
      cut: "",
      seq: message.seq ?? null,
      sessionId: message.sessionId ?? null,
      interrupted: Boolean(message.interrupted),
      stored: true,
      fromHistory,
    };
    // Replayed messages go before what is still pending (unsent messages, a live reply).
    const firstPending = this.entries.findIndex((e) => !e.stored);
    if (firstPending >= 0 && !fromHistory) this.entries.splice(firstPending, 0, entry);
    else this.entries.push(entry);
    this.render();
  }

  add(entry) {
    this.entries.push({ cut: "", interrupted: false, stored: false, sessionId: this.sessionId, ...entry });
    this.render();
    return this.entries.at(-1);
  }

  remove(entry) {
    this.entries = this.entries.filter((e) => e !== entry);
    this.render();
  }

  render() {
    const items = this.entries.map((entry) => {
      const item = document.createElement("li");
      item.className = `msg ${entry.role}`;
      if (entry.streaming) item.classList.add("streaming");
      if (entry.interrupted) item.classList.add("interrupted");
      if (entry.speaking) item.classList.add("speaking");
      if (entry.sessionId && this.sessionId && entry.sessionId !== this.sessionId) item.classList.add("other-session");
      item.dataset.role = entry.role;
      if (entry.seq !== null && entry.seq !== undefined) item.dataset.seq = String(entry.seq);
      item.dataset.state = this.stateOf(entry);
      if (entry.interrupted) {
        const flag = document.createElement("span");
        flag.className = "flag";
        flag.textContent = entry.late ? "interrupted after it was sent" : "interrupted · only the heard part is kept";
        item.append(flag);
      }
      const text = document.createElement("span");
      text.className = "text";
      if (entry.speaking && entry.heard > 0 && !entry.interrupted) {
        const heard = document.createElement("span");
        heard.className = "heard";
        heard.textContent = entry.text.slice(0, entry.heard);
        text.append(heard, entry.text.slice(entry.heard));
      } else {
        text.textContent = entry.text;
      }
      item.append(text);
      if (entry.cut) {
        const cut = document.createElement("span");
        cut.className = "cut";
        cut.title = "not heard: not stored";
        cut.textContent = entry.cut;
        item.append(cut);
      }
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = this.metaOf(entry);
      item.append(meta);
      return item;
    });
    this.list.replaceChildren(...items);
    this.list.lastElementChild?.scrollIntoView({ block: "nearest" });
  }

  stateOf(entry) {
    if (entry.streaming) return "streaming";
    if (!entry.stored) return entry.role === "user" ? "sending" : "unsaved";
    if (entry.seq !== null && entry.sessionId === this.sessionId && entry.seq <= this.durableSeq) return "durable";
    return entry.fromHistory ? "history" : "stored";
  }

  metaOf(entry) {
    const parts = [];
    const state = this.stateOf(entry);
    if (entry.speaking) parts.push(`speaking · heard ${entry.heard} of ${entry.text.length} characters`);
    if (state === "sending") parts.push("sending…");
    else if (state === "streaming") parts.push("streaming…");
    else if (state === "durable") parts.push(`✓✓ durable · #${entry.seq}`);
    else if (state === "history") parts.push(`history${entry.seq ? ` · #${entry.seq}` : ""}`);
    else if (state === "stored") parts.push(`✓ stored${entry.seq ? ` · #${entry.seq}` : ""}`);
    else parts.push("not stored");
    if (entry.replayed) parts.push("replayed after reconnect");
    return parts.join(" · ");
  }
}

// -- speech out --------------------------------------------------------------------------

/**
 * Speaks the streaming reply and tracks how much of it the user has heard: the
 * word-boundary progress of speechSynthesis, or what a test says with simulateHeard.
 */
class SpeechOut {
  constructor(onProgress) {
    this.onProgress = onProgress;
    this.simulated = false;
    this.enabled = false;
    this.reset(null);
  }

  reset(replyId) {
    this.replyId = replyId;
    this.text = "";
    this.queuedTo = 0; // characters handed to the speech engine
    this.heard = 0; // characters the user has heard
    this.playing = false;
    this.done = false;
  }

  get speaking() {
    if (!this.enabled || this.replyId === null) return false;
    if (this.simulated) return this.playing;
    return this.playing || this.queuedTo > this.heard;
  }

  startReply(replyId) {
    if (!this.simulated) globalThis.speechSynthesis?.cancel();
    this.reset(replyId);
  }

  /** The reply's text so far; speak whole phrases as they arrive. */
  update(text, { done = false } = {}) {
    this.text = text;
    this.done = done;
    if (!this.enabled || this.simulated || !globalThis.speechSynthesis) return;
    const rest = text.slice(this.queuedTo);
    const phrase = done ? rest.length : Math.max(rest.search(/[.!?;:,]\s[^.!?;:,]*$/) + 1, 0);
    if (phrase > 0) this._speak(this.queuedTo, text.slice(this.queuedTo, this.queuedTo + phrase));
  }

  _speak(offset, segment) {
    if (!segment.trim()) {
      this.queuedTo = offset + segment.length;
      return;
    }
    this.queuedTo = offset + segment.length;
    const utterance = new SpeechSynthesisUtterance(segment);
    const replyId = this.replyId;
    utterance.onstart = () => {
      if (replyId !== this.replyId) return;
      this.playing = true;
      this.onProgress();
    };
    utterance.onboundary = (event) => {
      // The word at charIndex is being spoken: everything before it was heard.
      if (replyId !== this.replyId || event.name === "sentence") return;
      this.heard = Math.max(this.heard, offset + event.charIndex);
      this.onProgress();
    };
    utterance.onend = () => {
      if (replyId !== this.replyId) return;
      this.heard = Math.max(this.heard, offset + segment.length);
      this.playing = globalThis.speechSynthesis.pending || globalThis.speechSynthesis.speaking;
      this.onProgress();
    };
    utterance.onerror = utterance.onend;
    globalThis.speechSynthesis.speak(utterance);
  }

  /** Test hook: the user has heard `chars` characters of the reply, which is still playing. */
  simulateHeard(chars) {
    this.heard = Math.min(chars, this.text.length);
    this.playing = true;
    this.onProgress();
  }

  simulateEnd() {
    this.heard = this.text.length;
    this.playing = false;
    this.onProgress();
  }

  stop() {
    this.playing = false;
    this.queuedTo = this.heard;
    if (!this.simulated) globalThis.speechSynthesis?.cancel();
    this.replyId = null;
  }
}

// -- the page --------------------------------------------------------------------------

const transcript = new Transcript($("#transcript"));
const speech = new SpeechOut(() => renderSpeaking());
let client = null;
let recognition = null;
let bargedIn = null; // replyId cut by the user, until the server answers

function setConnection(status, detail = "") {
  const badge = $("#connection");
  badge.dataset.status = status;
  badge.textContent = detail ? `${status} · ${detail}` : status;
}

function setStatusLine(text) {
  $("#status-line").textContent = text;
}

function showResume(text) {
  const notice = $("#resume");
  notice.hidden = !text;
  notice.textContent = text ?? "";
}

async function pollHealth() {
  try {
    const response = await fetch("/healthz", { cache: "no-store" });
    const body = await response.json();
    const persistence = body.persistence ?? {};
    const badge = $("#persistence");
    badge.dataset.mode = persistence.mode ?? "";
    const pending = persistence.pendingWrites ? ` · ${persistence.pendingWrites} pending` : "";
    badge.textContent = `persistence: ${persistence.mode ?? "?"}${pending}`;
  } catch {
    $("#persistence").textContent = "persistence: unreachable";
  }
}

function currentReplyEntry() {
  const reply = client?.currentReply;
  return reply ? transcript.byReply(reply.replyId) : null;
}

function renderSpeaking() {
  for (const entry of transcript.entries) {
    const speaking = speech.replyId !== null && entry.replyId === speech.replyId && speech.speaking;
    entry.speaking = speaking;
    entry.heard = speaking ? speech.heard : 0;
  }
  transcript.render();
  $("#stop").disabled = !(speech.speaking || client?.currentReply);
}

/** Barge in: cut the reply; the server stores only what was heard. */
function bargeIn(reason) {
  const replyId = speech.speaking ? speech.replyId : client?.currentReply?.replyId;
  if (!replyId || bargedIn === replyId) return false;
  const heardChars = speech.speaking ? speech.heard : undefined;
  bargedIn = replyId;
  client.interrupt({ heardChars, reason, replyId });
  speech.stop();
  renderSpeaking();
  return true;
}

function sendText(text) {
  const trimmed = text.trim();
  if (!trimmed || !client) return;
  if (speech.speaking) bargeIn("barge_in");
  const { clientId, ack } = client.send(trimmed);
  const entry = transcript.add({ role: "user", text: trimmed, clientId, seq: null });
  ack
    .then((frame) => {
      entry.seq = frame.seq;
      entry.stored = true;
      entry.replayed = Boolean(frame.replayed);
      transcript.render();
    })
    .catch(() => {
      entry.failed = true;
      transcript.render();
    });
}

function onUserSpeech(text, { final }) {
  if (speech.speaking) bargeIn("barge_in");
  if (final) sendText(text);
  else setStatusLine(`hearing: ${text}`);
}

function startRecognition() {
  const Recognition = globalThis.SpeechRecognition ?? globalThis.webkitSpeechRecognition;
  if (!Recognition) {
    setStatusLine("Speech recognition is not available in this browser: type, and replies are spoken.");
    return;
  }
  recognition = new Recognition();
  recognition.continuous = true;
  recognition.interimResults = true;
  recognition.lang = navigator.language || "en-US";
  recognition.onspeechstart = () => {
    if (speech.speaking) bargeIn("barge_in");
  };
  recognition.onresult = (event) => {
    for (let i = event.resultIndex; i < event.results.length; i++) {
      const result = event.results[i];
      onUserSpeech(result[0].transcript, { final: result.isFinal });
    }
  };
  recognition.onend = () => {
    if (speech.enabled && recognition) recognition.start(); // keep listening
  };
  try {
    recognition.start();
    setStatusLine("Listening… speak, or type. Speaking while the assistant talks interrupts it.");
  } catch (error) {
    setStatusLine(`Microphone unavailable: ${error.message}`);
  }
}

function setVoice(enabled, { simulated = false } = {}) {
  speech.enabled = enabled;
  speech.simulated = simulated;
  $("#voice").setAttribute("aria-pressed", String(enabled));
  if (!enabled) {
    speech.stop();
    const stopping = recognition;
    recognition = null;
    stopping?.stop();
    setStatusLine("");
  } else if (!simulated) {
    if (!globalThis.speechSynthesis) setStatusLine("This browser cannot speak (no speechSynthesis).");
    startRecognition();
  }
  renderSpeaking();
}

function wire(c) {
  c.on("status", (event) => {
    if (event.status === Status.RECONNECTING && event.delay !== undefined) {
      setConnection("reconnecting", `attempt ${event.attempt}, in ${(event.delay / 1000).toFixed(1)} s`);
    } else if (event.status === Status.OPEN && event.resumed) {
      setConnection("open", event.recovered ? "resumed" : "reloaded");
    } else {
      setConnection(event.status);
    }
  });
  c.on("started", (frame) => {
    transcript.sessionId = frame.sessionId;
    sessionStorage.setItem(SESSION_KEY, frame.sessionId);
    $("#identity").textContent = `user ${frame.userId} · session ${frame.sessionId.slice(0, 12)}`;
    if (!frame.resumed || transcript.entries.length === 0) {
      const pending = transcript.entries.filter((e) => !e.stored);
      transcript.clear();
      for (const message of frame.history) transcript.addStored(message, { fromHistory: true });
      for (const entry of pending) transcript.entries.push(entry);
      transcript.render();
    }
  });
  c.on("resume", (frame) => {
    if (frame.recovered) {
      for (const message of frame.messages) {
        transcript.addStored(message);
        const entry = transcript.bySeq(message.seq);
        if (entry) entry.replayed = true;
      }
      const n = frame.messages.length;
      showResume(`Reconnected and resumed: ${n} missed message${n === 1 ? "" : "s"} replayed${frame.inFlight ? ", the reply goes on" : ""}.`);
    }
    transcript.render();
  });
  c.on("resume.failed", ({ reason, history }) => {
    showResume(`Reconnected, but missed messages could not be replayed (${reason}): conversation reloaded.`);
    const pending = transcript.entries.filter((e) => !e.stored && e.role === "user");
    transcript.clear();
    for (const message of history) transcript.addStored(message, { fromHistory: true });
    for (const entry of pending) transcript.entries.push(entry);
    transcript.render();
  });
  c.on("reply.lost", ({ replyId }) => {
    const entry = transcript.byReply(replyId);
    if (entry && !entry.stored) transcript.remove(entry);
  });
  c.on("reply.resumed", (inFlight) => {
    let entry = transcript.byReply(inFlight.replyId);
    if (!entry) entry = transcript.add({ role: "assistant", text: "", replyId: inFlight.replyId, seq: null });
    entry.text = inFlight.text;
    entry.streaming = true;
    transcript.render();
  });
  c.on("reply.start", (frame) => {
    transcript.add({ role: "assistant", text: "", replyId: frame.replyId, seq: null, streaming: true });
    speech.startReply(frame.replyId);
    renderSpeaking();
  });
  c.on("reply.chunk", (frame) => {
    const entry = transcript.byReply(frame.replyId);
    if (!entry) return;
    entry.text = c.currentReply?.replyId === frame.replyId ? c.currentReply.text : entry.text + frame.text;
    if (speech.replyId === frame.replyId) speech.update(entry.text);
    renderSpeaking();
  });
  c.on("reply.end", (frame) => {
    const entry = transcript.byReply(frame.replyId);
    if (!entry) return;
    entry.text = frame.text;
    entry.streaming = false;
    entry.stored = frame.seq !== null;
    entry.seq = frame.seq;
    entry.interrupted = !frame.complete;
    if (speech.replyId === frame.replyId) speech.update(frame.text, { done: true });
    renderSpeaking();
  });
  c.on("interrupted", (frame) => {
    const entry = transcript.byReply(frame.replyId);
    if (bargedIn === frame.replyId) bargedIn = null;
    if (!entry) return;
    entry.streaming = false;
    entry.interrupted = true;
    if (frame.late) {
      entry.late = true;
      entry.heardChars = frame.heard.length;
    } else {
      entry.cut = entry.text.startsWith(frame.heard) ? entry.text.slice(frame.heard.length) : "";
      entry.text = frame.heard;
      entry.seq = frame.seq;
      entry.stored = frame.seq !== null;
    }
    renderSpeaking();
  });
  c.on("message", (frame) => {
    transcript.addStored(frame.message);
  });
  c.on("durable", () => {
    transcript.durableSeq = c.durableSeq;
    transcript.render();
  });
  c.on("error", (error) => {
    setStatusLine(`${error.code}: ${error.message} (${error.action})`);
  });
  c.on("close", (event) => {
    setConnection("closed", event.action === "new_session" ? "session ended" : event.reason || String(event.code));
  });
}

async function main() {
  const config = await (await fetch("/demo/config.json", { cache: "no-store" })).json();
  let userId;
  let token = null;
  if (config.auth === "firebase") {
    if (!config.firebase?.apiKey) {
      setConnection("closed", "set SAMVAD_DEMO_FIREBASE_API_KEY");
      throw new Error("Firebase auth is on but the demo has no Web API key");
    }
    const user = new AnonymousFirebaseUser(config.firebase);
    setConnection("connecting", "signing in anonymously");
    userId = await user.signIn();
    token = (request) => user.token(request);
  } else {
    userId = localUserId();
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  client = new SamvadClient({
    url: `${scheme}://${location.host}/ws`,
    userId,
    sessionId: params.get("session") ?? sessionStorage.getItem(SESSION_KEY),
    language: navigator.language || "en",
    token,
    reconnect: { initialDelay: 300, maxDelay: 10000 },
  });
  wire(client);
  pollHealth();
  setInterval(pollHealth, 3000);
  await client.connect();
}

$("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("#text");
  sendText(input.value);
  input.value = "";
});
$("#text").addEventListener("input", () => {
  // Typing while the assistant talks is a barge-in, like speaking.
  if (speech.speaking && $("#text").value.trim()) bargeIn("typing");
});
$("#stop").addEventListener("click", () => bargeIn("stop_button"));
$("#voice").addEventListener("click", () => setVoice(!speech.enabled));

const ready = main().catch((error) => {
  setStatusLine(String(error.message ?? error));
  throw error;
});

// Test hooks: headless browsers have no voices and no microphone, so tests drive the
// speech side through these (the same code paths the real speech engine takes).
window.samvadDemo = {
  ready,
  get client() {
    return client;
  },
  enableVoice({ simulated = false } = {}) {
    setVoice(true, { simulated });
  },
  simulateHeard(chars) {
    speech.simulateHeard(chars);
  },
  simulateSpeechEnd() {
    speech.simulateEnd();
  },
  simulateUserSpeech(text, { final = true } = {}) {
    onUserSpeech(text, { final });
  },
  dropConnection() {
    client.dropConnection("dropped by the test");
  },
  transcript() {
    return transcript.entries.map((e) => ({
      role: e.role,
      text: e.text,
      seq: e.seq,
      interrupted: e.interrupted,
      state: transcript.stateOf(e),
    }));
  },
};

// The rccs client for protocol v1 (docs/protocol.md), for browsers and Node. Durations in this API are
// milliseconds; the client converts them to the seconds the wire uses.

import { decode, encode } from "@msgpack/msgpack";

import {
  ConnectionClosed, HandoffFailed, HandoffRefusal, RccsError, ReceiptTimeout, RequestTimeout, StaleEpoch, errorFrom,
} from "./errors.js";
import { mergePatch } from "./mergepatch.js";
import { AsyncQueue, TimeoutError } from "./queue.js";

let DefaultWebSocket = globalThis.WebSocket;

/** The WebSocket class new clients use when none is given in the options (Node: the `ws` package). */
export function setWebSocket(implementation) {
  DefaultWebSocket = implementation;
}

// Close codes after which reconnecting cannot help (protocol.md section 7).
export const FATAL_CLOSE_CODES = new Set([4400, 4401, 4403, 4409, 4410]);
// Receipt statuses after which send({ack: true}) stops waiting for a device: the final ones, and `queued`
// (on disk for an offline device; its final receipt comes later as a "receipt" event).
const SETTLED_STATUSES = new Set(["delivered", "failed", "expired", "queued", "retracted"]);
const REPLY_OPS = new Set(["devices", "device", "ok", "sessions", "refreshed", "pair.code", "state", "state.ok",
  "state.subscribed", "task.lease", "task.released", "tasks", "pong"]);
const EVENT_OPS = new Set(["presence", "pair.request", "pair.joined", "pair.withdrawn", "retract"]);
const SEEN_MESSAGES = 10000; // (from, id) of ack:true messages remembered to recognise redeliveries
const CALL_GRACE = 5000; // how much longer than a call's timeout call() waits for the server's answer
const HELLO_TIMEOUT = 30000;
// How long handoff() waits for the outcome by default: the server's default prepare (10 s) and accept (30 s)
// timeouts, after which it reports handoff.failed itself, and some time for the messages.
const HANDOFF_TIMEOUT = 10000 + 30000 + CALL_GRACE;
const SEEN_HANDOFFS = 1000; // handoff ids remembered to act on a repeated handoff.committed once
const TRANSIENT_ERRORS = new Set(["rate_limited", "internal", "overloaded"]); // a renewal refused for now

/** Sending needs an open connection and there is none right now. */
export class NotConnected extends Error {
  constructor() {
    super("not connected");
    this.name = "NotConnected";
  }
}

function randomHex(bytes) {
  const data = new Uint8Array(bytes);
  globalThis.crypto.getRandomValues(data);
  return Array.from(data, (b) => b.toString(16).padStart(2, "0")).join("");
}

function withTimeout(promise, ms, makeError) {
  if (ms == null) return promise;
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(makeError()), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  promise.catch(() => {}); // rejections are seen by whoever awaits it; never "unhandled"
  return { promise, resolve, reject, done: false };
}

function settle(pending, error, value) {
  if (!pending || pending.done) return;
  pending.done = true;
  if (error) pending.reject(error);
  else pending.resolve(value);
}

const messageKey = (from, id) => JSON.stringify([from, id]);
const seconds = (ms) => ms / 1000;

/**
 * A device's connection to rccs. `await connect()` says hello and returns the `welcome`; after a lost
 * connection the client reconnects with backoff and full jitter and resumes its session.
 */
export class Client {
  constructor(url, options = {}) {
    const {
      token = null, credential = null, pairingCode = null, device = null, encoding = "msgpack", autoAck = true,
      reconnect = true, backoffInitial = 200, backoffMax = 15000, requestTimeout = 30000, onMessage = null,
      onPending = null, WebSocket = null,
    } = options;
    if (encoding !== "msgpack" && encoding !== "json") throw new TypeError("encoding must be 'msgpack' or 'json'");
    if (token == null && credential == null && pairingCode == null) {
      throw new TypeError("give a token, a credential or a pairing code");
    }
    this.url = url;
    this.token = token;
    this.credential = credential;
    this.pairingCode = pairingCode;
    this.device = device == null ? null : { ...device };
    this.encoding = encoding;
    this.autoAck = autoAck;
    this.reconnect = reconnect;
    this.backoffInitial = backoffInitial;
    this.backoffMax = backoffMax;
    this.requestTimeout = requestTimeout;
    this.onMessage = onMessage;
    this.onPending = onPending;
    this.WebSocket = WebSocket ?? DefaultWebSocket;
    if (!this.WebSocket) throw new TypeError("no WebSocket implementation (in Node, import from 'rccs-client')");

    this.welcome = null; // the latest welcome
    this.sessionId = null;
    this.deviceId = null;
    this.user = null;
    this.paired = null; // the `paired` envelope, after pairing
    this.lastSeq = 0; // highest seq received in the current session
    this.reconnects = 0;
    this.duplicates = 0; // redelivered messages not handed to the application again

    this._ids = 0;
    this._idPrefix = randomHex(4);
    this._ws = null;
    this._conn = null; // {ws, lost: deferred, closeCode, closeReason, welcomed}
    this._connected = false;
    this._connectedWaiters = [];
    this._closing = false;
    this._finished = null; // the ConnectionClosed once the client stopped for good
    this._closed = deferred();
    this._reconnectTimer = null;
    this._clockOffset = 0;
    this._generation = 0; // +1 for every new (not resumed) session: seqs of older ones mean nothing
    this._seen = new Map(); // messageKey -> {seq, generation, stage: queued | handling | taken}
    this._inbox = new AsyncQueue();
    this._waiters = new Map(); // send id -> receipt waiter
    this._requests = new Map(); // request id -> deferred
    this._calls = new Map(); // call id -> deferred
    this._handlers = new Map(); // method -> handler
    this._listeners = new Map(); // event name -> Set of functions
    this._subscriptions = [];
    this._welcomed = null; // deferred of the connection attempt under way
    this._handoffRequests = new Map(); // request id -> outcome deferred (until handoff.started)
    this._handoffOutcomes = new Map(); // handoff id -> outcome deferred
    this._handoffsSeen = new Set(); // recent "op handoff" told to the application
    this._keepers = new Map(); // task -> its TaskKeeper
    this._handoffCallbacks = { prepare: null, offer: null, gained: null, lost: null, failed: null };
  }

  // ---- lifecycle ----------------------------------------------------------

  /** Resolves with the ConnectionClosed once the client has stopped for good. */
  get closed() {
    return this._closed.promise;
  }

  get connected() {
    return this._connected;
  }

  /** Connect and say hello (or redeem the pairing code); resolves with the `welcome`. */
  async connect() {
    if (this._finished) throw this._finished;
    return this._connectOnce();
  }

  _connectOnce() {
    const welcomed = this._welcomed = deferred();
    const conn = { ws: null, lost: deferred(), closeCode: null, closeReason: "", welcomed: false, error: null };
    let ws;
    try {
      ws = new this.WebSocket(this.url);
    } catch (error) {
      return Promise.reject(error);
    }
    conn.ws = ws;
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this._conn = conn;
    ws.addEventListener("open", () => {
      if (this._conn !== conn) return;
      try {
        this._send(this._helloEnvelope());
      } catch (error) {
        settle(welcomed, error);
      }
    });
    ws.addEventListener("message", (event) => {
      if (this._conn !== conn) return;
      let envelope;
      try {
        envelope = typeof event.data === "string" ? JSON.parse(event.data) : decode(new Uint8Array(event.data));
      } catch (error) {
        this._emit("error", new RccsError("bad_frame", `undecodable envelope from the server: ${error.message}`));
        return;
      }
      this._onEnvelope(envelope, conn);
    });
    ws.addEventListener("error", () => {}); // a close event follows
    ws.addEventListener("close", (event) => {
      conn.closeCode = event.code;
      conn.closeReason = event.reason || "";
      this._onDisconnected(conn);
    });
    const pairing = this.token == null && this.credential == null;
    return withTimeout(welcomed.promise, pairing ? null : HELLO_TIMEOUT,
      () => new RequestTimeout("hello")).catch((error) => {
      if (this._conn === conn) this._abort(ws);
      throw error;
    });
  }

  _helloEnvelope() {
    if (this.token == null && this.credential == null) {
      return { op: "pair.redeem", id: "pair", code: this.pairingCode, device: this.device ?? undefined };
    }
    const hello = { op: "hello" };
    if (this.credential != null) hello.credential = this.credential;
    else hello.token = this.token;
    if (this.device != null) hello.device = this.device;
    if (this.sessionId != null) hello.resume = { session: this.sessionId, last_seq: this.lastSeq };
    return hello;
  }

  _abort(ws) {
    try {
      if (typeof ws.terminate === "function") ws.terminate();
      else ws.close();
    } catch {
      // already closed
    }
  }

  _onWelcome(envelope, conn) {
    conn.welcomed = true;
    if (!envelope.resumed) {
      this.lastSeq = 0;
      this._generation += 1;
    }
    this.welcome = envelope;
    this.sessionId = envelope.session;
    this.deviceId = envelope.device;
    this.user = envelope.user;
    if (typeof envelope.server_time === "number") this._clockOffset = envelope.server_time - Date.now();
    this._connected = true;
    for (const waiter of this._connectedWaiters.splice(0)) waiter.resolve();
    settle(this._welcomed, null, envelope);
  }

  _onDisconnected(conn) {
    if (this._conn !== conn) return;
    this._connected = false;
    settle(conn.lost, null, conn.closeCode);
    if (!conn.welcomed) {
      // The attempt was refused: the server's error (sent before the close) says why.
      const closed = new ConnectionClosed(conn.closeCode, conn.closeReason || conn.error?.message || "refused");
      closed.error = conn.error;
      settle(this._welcomed, closed);
      return;
    }
    for (const call of this._calls.values()) {
      settle(call, new RccsError("disconnected", "the connection ended before the result arrived"));
    }
    for (const request of this._requests.values()) {
      if (!request.resend) settle(request, new RccsError("disconnected", "the connection ended before the answer"));
    }
    const code = conn.closeCode;
    if (this._closing || !this.reconnect || FATAL_CLOSE_CODES.has(code)) {
      this._finish(new ConnectionClosed(code, conn.closeReason || "closed"));
      return;
    }
    this._emit("disconnect", { code, reason: conn.closeReason });
    this._reconnectLoop();
  }

  async _reconnectLoop() {
    let delay = this.backoffInitial;
    for (;;) {
      // Full jitter: a random wait between 0 and the current backoff, so devices do not come back in step.
      await new Promise((resolve) => {
        this._reconnectTimer = setTimeout(resolve, Math.random() * delay);
      });
      this._reconnectTimer = null;
      if (this._closing || this._finished) return;
      try {
        await this._connectOnce();
      } catch (error) {
        if (error instanceof ConnectionClosed && FATAL_CLOSE_CODES.has(error.code)) {
          this._finish(error);
          return;
        }
        if (this._closing) {
          this._finish(new ConnectionClosed(1000, "closed by client"));
          return;
        }
        delay = Math.min(delay * 2, this.backoffMax);
        continue;
      }
      this.reconnects += 1;
      this._resubscribeState();
      this._emit("reconnect", this.welcome);
      return;
    }
  }

  _finish(reason) {
    if (this._finished) return;
    this._finished = reason;
    this._connected = false;
    for (const waiter of this._connectedWaiters.splice(0)) waiter.reject(reason);
    this._inbox.end(reason);
    for (const subscription of this._subscriptions) subscription._queue.end(reason);
    for (const waiter of this._waiters.values()) settle(waiter.pending, reason);
    for (const pending of [...this._requests.values(), ...this._calls.values(), ...this._handoffRequests.values(),
      ...this._handoffOutcomes.values()]) settle(pending, reason);
    for (const keeper of [...this._keepers.values()]) keeper._end(null);
    settle(this._closed, null, reason);
    this._emit("close", reason);
  }

  /** Close the connection for good (1000: the session ends) and stop reconnecting. */
  async close() {
    this._closing = true;
    if (this._reconnectTimer) clearTimeout(this._reconnectTimer);
    const conn = this._conn;
    if (conn && conn.ws.readyState <= 1) {
      conn.ws.close(1000);
      await withTimeout(conn.lost.promise, 5000, () => new RequestTimeout("close")).catch(() => this._abort(conn.ws));
    }
    this._finish(new ConnectionClosed(1000, "closed by client"));
  }

  // ---- events -------------------------------------------------------------

  /**
   * Listen to `name`: a server event op (`presence`, `pair.request`, `pair.joined`, `pair.withdrawn`,
   * `retract`), or `receipt` (a receipt no send() waits for), `error` (an error about nothing pending),
   * `disconnect`, `reconnect`, `close`, `state` (every state change). Returns a function that stops listening.
   */
  on(name, listener) {
    let set = this._listeners.get(name);
    if (!set) this._listeners.set(name, set = new Set());
    set.add(listener);
    return () => set.delete(listener);
  }

  /** The next `name` event (see on()) from now on, within `timeout` ms. */
  nextEvent(name, { timeout = this.requestTimeout, filter = null } = {}) {
    return new Promise((resolve, reject) => {
      const off = this.on(name, (event) => {
        if (filter && !filter(event)) return;
        off();
        clearTimeout(timer);
        resolve(event);
      });
      const timer = setTimeout(() => {
        off();
        reject(new TimeoutError(`no ${name} event within ${timeout} ms`));
      }, timeout);
    });
  }

  _emit(name, value) {
    const set = this._listeners.get(name);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(value);
      } catch (error) {
        console.error(`rccs-client: a ${name} listener failed`, error);
      }
    }
  }

  // ---- output -------------------------------------------------------------

  _send(envelope) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) throw new NotConnected();
    ws.send(this.encoding === "msgpack" ? encode(envelope, { ignoreUndefined: true }) : JSON.stringify(envelope));
  }

  async _sendWhenConnected(envelope, timeout = this.requestTimeout) {
    if (!this._connected) {
      if (this._finished) throw this._finished;
      await withTimeout(new Promise((resolve, reject) => this._connectedWaiters.push({ resolve, reject })),
        timeout, () => new RequestTimeout(`${envelope.op} (not connected)`));
    }
    this._send(envelope);
  }

  /** A fresh id for a message or request: unique for this client. */
  newId() {
    this._ids += 1;
    return `${this._idPrefix}-${this._ids}`;
  }

  /**
   * Send a message to the devices `to` selects (a selector map, or a device id). Without `ack`, resolves to []
   * once sent. With `ack: true`, resolves once every target device has a settled receipt (`delivered`,
   * `failed`, `expired`, `retracted`, or `queued` for an offline device) with the receipts so far; rejects with
   * RccsError if the server refuses the send, ReceiptTimeout after `timeout` ms.
   */
  async send(to, type, body = null, options = {}) {
    const { ack = false, id = null, timeout = this.requestTimeout, ttl, priority, durable, firstAck } = options;
    const msgId = id ?? this.newId();
    const envelope = { op: "send", id: msgId, to: typeof to === "string" ? { device: to } : to, type, body };
    if (ttl != null) envelope.ttl = seconds(ttl);
    if (priority != null) envelope.priority = priority;
    if (durable) envelope.durable = true;
    if (firstAck) envelope.first_ack = true;
    if (!ack) {
      await this._sendWhenConnected(envelope);
      return [];
    }
    envelope.ack = true;
    const waiter = { pending: deferred(), receipts: [], expected: null, settled: new Set() };
    this._waiters.set(msgId, waiter);
    try {
      await this._sendWhenConnected(envelope);
      return await withTimeout(waiter.pending.promise, timeout, () => new ReceiptTimeout([...waiter.receipts]));
    } finally {
      this._waiters.delete(msgId);
    }
  }

  _onReceipt(envelope) {
    const waiter = this._waiters.get(envelope.id);
    if (!waiter || waiter.pending.done) {
      if (envelope.status !== "routed") this._emit("receipt", receiptOf(envelope));
      return;
    }
    const status = envelope.status;
    if (status === "routed") {
      waiter.expected = new Set([...(envelope.devices ?? []), ...(envelope.queued ?? [])]);
    } else {
      const receipt = receiptOf(envelope);
      waiter.receipts.push(receipt);
      if (status === "duplicate") { // an earlier send with this id was taken: nothing more comes
        settle(waiter.pending, null, waiter.receipts);
        return;
      }
      if (status === "moved" && waiter.expected) { // a pick:"one" message went to another device
        waiter.expected.delete(envelope.from_device);
        waiter.expected.add(String(envelope.device));
      }
      if (receipt.device != null && SETTLED_STATUSES.has(status)) waiter.settled.add(receipt.device);
    }
    if (waiter.expected && [...waiter.expected].every((device) => waiter.settled.has(device))) {
      settle(waiter.pending, null, waiter.receipts);
    }
  }

  /** Ack messages by hand (with `autoAck: false`): `seq` is a number or an array of them. */
  async ack(seq) {
    await this._sendWhenConnected({ op: "ack", seq });
  }

  /** Send a request op and resolve with its answer; rejects with RccsError for an `error` answer. */
  async request(op, fields = {}, { timeout = this.requestTimeout, id = null } = {}) {
    const requestId = id ?? `req-${this.newId()}`;
    const pending = deferred();
    this._requests.set(requestId, pending);
    try {
      await this._sendWhenConnected({ op, id: requestId, ...fields }, timeout);
      return await withTimeout(pending.promise, timeout, () => new RequestTimeout(`${op} ${requestId}`));
    } finally {
      this._requests.delete(requestId);
    }
  }

  /**
   * A request that may safely arrive twice (its id makes a repeat harmless): sent again after a reconnect if
   * the connection dropped before the answer. RequestTimeout after `timeout` ms.
   */
  async _requestResent(envelope, timeout = this.requestTimeout) {
    const deadline = Date.now() + timeout;
    const left = () => Math.max(0, deadline - Date.now());
    for (;;) {
      const pending = deferred();
      pending.resend = true;
      this._requests.set(envelope.id, pending);
      try {
        await this._sendWhenConnected(envelope, left());
        const lost = this._conn.lost.promise.then(() => "lost");
        const outcome = await withTimeout(Promise.race([pending.promise, lost]), left(),
          () => new RequestTimeout(`${envelope.op} ${envelope.id}`));
        if (outcome !== "lost") return outcome;
        if (pending.done) return pending.promise;
      } finally {
        this._requests.delete(envelope.id);
      }
    }
  }

  /** Round trip to the server; resolves with its clock (ms since the epoch). */
  async ping() {
    return (await this.request("ping")).server_time;
  }

  /** The server's clock now (ms since the Unix epoch), estimated from the latest welcome. */
  serverTime() {
    return Date.now() + this._clockOffset;
  }

  // ---- devices, sessions, pairing ----------------------------------------------

  /**
   * The user's devices: id, type, name, capabilities, status (online / away / offline), last_seen, ...; with
   * `counts: true` also `inbox` (messages waiting in its durable inbox) and `dead_letters`.
   */
  async devices({ counts = false } = {}) {
    // counts: each device also carries `inbox` and `dead_letters` (protocol.md 4.5)
    return (await this.request("devices", counts ? { counts: true } : {})).devices;
  }

  /** Change this device's (or, with `device`, another of the user's devices') description. */
  async updateDevice(changes, { device = null } = {}) {
    const fields = { set: changes };
    if (device != null) fields.device = device;
    return (await this.request("device.update", fields)).device;
  }

  async revokeDevice(device) {
    await this.request("device.revoke", { device });
  }

  async sessions() {
    return (await this.request("sessions")).sessions;
  }

  async revokeSession(session) {
    await this.request("session.revoke", { session });
  }

  /** `"away"` when the app goes to the background, `"online"` when it is back. */
  async setPresence(status) {
    await this.request("presence.set", { status });
  }

  /** Extend the session with a fresh token (or the credential); resolves with the new expires_at (ms). */
  async refresh({ token = null, credential = null } = {}) {
    if (token != null) {
      const reply = await this.request("refresh", { token });
      this.token = token;
      return reply.expires_at;
    }
    return (await this.request("refresh", { credential: credential ?? this.credential })).expires_at;
  }

  /** A code (with a `uri` for a QR code) a new device redeems to join this user. `ttl` in ms. */
  async createPairingCode({ approve = false, ttl = null } = {}) {
    const fields = { approve };
    if (ttl != null) fields.ttl = seconds(ttl);
    return this.request("pair.create", fields);
  }

  async approvePairing(request) {
    await this.request("pair.approve", { request });
  }

  async denyPairing(request) {
    await this.request("pair.deny", { request });
  }

  // ---- RPC ----------------------------------------------------------------------

  /**
   * Call `method` on one online device (`to`: a selector or a device id) and resolve with its result.
   * Rejects with RccsError: `offline`, `timeout` (after `timeout` ms), `disconnected`, `forbidden`, ... or the
   * code of the target's error (`unknown_method`, `handler_error`, or whatever its handler threw).
   */
  async call(to, method, params = null, { timeout = 30000, id = null } = {}) {
    const callId = id ?? this.newId();
    if (this._calls.has(callId)) throw new TypeError(`a call with id ${callId} is already waiting`);
    const envelope = { op: "call", id: callId, to: typeof to === "string" ? { device: to } : to, method, params,
      timeout: seconds(timeout) };
    const pending = deferred();
    this._calls.set(callId, pending);
    try {
      await this._sendWhenConnected(envelope);
      return await withTimeout(pending.promise, timeout + CALL_GRACE,
        () => new RccsError("timeout", "the server did not answer the call in time"));
    } finally {
      this._calls.delete(callId);
    }
  }

  /**
   * Answer calls of `method` with `handler(params, {from, method, deadline})` (its return value, or a promise
   * of it, is the result; null removes the handler). An RccsError it throws becomes an error result with its
   * code; any other error one with code `handler_error`. Methods without a handler get `unknown_method`.
   */
  onCall(method, handler) {
    if (handler == null) this._handlers.delete(method);
    else this._handlers.set(method, handler);
  }

  async _answerCall(envelope) {
    const handler = this._handlers.get(envelope.method);
    const answer = { op: "result", id: envelope.id };
    if (!handler) {
      answer.error = { code: "unknown_method", message: `no handler for method ${JSON.stringify(envelope.method)}` };
    } else {
      try {
        answer.result = (await handler(envelope.params ?? null,
          { from: envelope.from, method: envelope.method, deadline: envelope.deadline })) ?? null;
      } catch (error) {
        answer.error = error instanceof RccsError
          ? { code: error.code, message: error.serverMessage }
          : { code: "handler_error", message: `${error?.name ?? "Error"}: ${error?.message ?? error}` };
      }
    }
    try {
      this._send(answer);
    } catch (error) {
      if (error instanceof NotConnected) return; // the caller hears "disconnected" from the server
      this._send({ op: "result", id: envelope.id,
        error: { code: "handler_error", message: `the result cannot be encoded: ${error.message}` } });
    }
  }

  // ---- input --------------------------------------------------------------

  /** The next incoming message (acked now if it asked for an ack and autoAck is on). */
  async nextMessage({ timeout = null } = {}) {
    return this._taken(await this._inbox.next(timeout));
  }

  /** `for await (const m of client.messages())`: every message, each acked as the loop takes it. */
  async *messages() {
    for (;;) {
      let message;
      try {
        message = await this._inbox.next();
      } catch (error) {
        if (error instanceof ConnectionClosed) return;
        throw error;
      }
      yield this._taken(message);
    }
  }

  /**
   * The application has taken `message`: ack it now (autoAck), with the seq the server wrote it with last.
   * Returns the message carrying that seq, for an application that acks by hand.
   */
  _taken(message) {
    if (!message.ack) return message;
    const seen = this._seen.get(messageKey(message.from, message.id));
    if (!seen) { // forgotten (more than SEEN_MESSAGES since): its own seq is all there is
      this._ackNow(message.seq);
      return message;
    }
    seen.stage = "taken";
    // Written in a session that is gone: the server writes it again in this one, and that repeat (recognised
    // as taken) is acked when it arrives.
    if (seen.generation !== this._generation) return message;
    this._ackNow(seen.seq);
    return seen.seq === message.seq ? message : { ...message, seq: seen.seq };
  }

  _ackNow(seq) {
    if (!this.autoAck) return;
    try {
      this._send({ op: "ack", seq });
    } catch (error) {
      if (!(error instanceof NotConnected)) throw error;
    }
  }

  _onMsg(envelope) {
    const message = { seq: envelope.seq, id: envelope.id, from: envelope.from, type: envelope.type,
      body: envelope.body ?? null, ts: envelope.ts, ack: Boolean(envelope.ack) };
    const key = messageKey(message.from, message.id);
    const seen = message.ack ? this._seen.get(key) : undefined;
    if (seen) {
      // Redelivered (after a resume, an ack timeout, or from the inbox after a reconnect): never handed to the
      // application twice. Acked again only once the application has taken it (the first ack may be lost);
      // until then the ack that taking it sends uses this latest seq.
      this.duplicates += 1;
      this.lastSeq = Math.max(this.lastSeq, message.seq);
      if (seen.stage === "taken") this._ackNow(message.seq);
      else {
        seen.seq = message.seq;
        seen.generation = this._generation;
      }
      return;
    }
    if (!message.ack && message.seq <= this.lastSeq) {
      this.duplicates += 1;
      return;
    }
    this.lastSeq = Math.max(this.lastSeq, message.seq);
    if (message.ack) {
      this._seen.set(key, { seq: message.seq, generation: this._generation, stage: "queued" });
      if (this._seen.size > SEEN_MESSAGES) this._seen.delete(this._seen.keys().next().value);
    }
    if (this.onMessage) this._dispatch(message, key);
    else this._inbox.push(message);
  }

  async _dispatch(message, key) {
    const seen = message.ack ? this._seen.get(key) : undefined;
    if (seen) seen.stage = "handling";
    try {
      await this.onMessage(message);
    } catch (error) {
      console.error(`rccs-client: onMessage failed for message ${message.id}`, error);
      // not taken: the server's next write of it gets another try
      if (seen && this._seen.get(key) === seen) this._seen.delete(key);
      return;
    }
    this._taken(message);
  }

  _onEnvelope(envelope, conn) {
    if (envelope === null || typeof envelope !== "object" || Array.isArray(envelope)) return;
    const op = envelope.op;
    if (op === "msg") this._onMsg(envelope);
    else if (op === "receipt") this._onReceipt(envelope);
    else if (op === "welcome") this._onWelcome(envelope, conn);
    else if (op === "result") {
      const call = this._calls.get(envelope.id);
      if (envelope.error && typeof envelope.error === "object") {
        settle(call, new RccsError(String(envelope.error.code), String(envelope.error.message ?? ""),
          { from: envelope.from }));
      } else settle(call, null, envelope.result ?? null);
    } else if (op === "call") this._answerCall(envelope);
    else if (typeof op === "string" && op.startsWith("handoff.")) this._onHandoff(envelope);
    else if (op === "state.changed" || (op === "state" && !this._requests.has(envelope.id))) this._onState(envelope);
    else if (REPLY_OPS.has(op) && this._requests.has(envelope.id)) settle(this._requests.get(envelope.id), null, envelope);
    else if (op === "paired") {
      this.credential = envelope.credential;
      this.paired = envelope;
    } else if (op === "pair.pending") {
      if (this.onPending) this.onPending(envelope);
      this._emit(op, envelope);
    } else if (EVENT_OPS.has(op)) this._emit(op, envelope);
    else if (op === "error") this._onError(envelope, conn);
    // other ops: ignored (forward compatibility, protocol.md section 1)
  }

  _onError(envelope, conn) {
    const error = errorFrom(envelope);
    const id = envelope.id;
    const waiter = this._waiters.get(id);
    if (waiter && !waiter.pending.done) settle(waiter.pending, error);
    else if (this._requests.has(id) && !this._requests.get(id).done) settle(this._requests.get(id), error);
    else if (this._calls.has(id) && !this._calls.get(id).done) settle(this._calls.get(id), error);
    else if (!conn.welcomed) {
      conn.error = error; // the close that follows says hello was refused
      if (id === "pair") { // a refused code: the connection stays open for another try; this one is done
        settle(this._welcomed, error);
        this._abort(conn.ws);
      }
    } else this._emit("error", error);
  }

  // ---- state documents (protocol.md section 14) -----------------------------

  /** `{doc, rev, value}` of a document (`rev` 0 and `value` null when it does not exist). */
  async stateGet(doc) {
    const reply = await this.request("state.get", { doc });
    return { doc, rev: reply.rev, value: reply.value ?? null };
  }

  /**
   * Apply a JSON merge patch (RFC 7396) to `doc`; resolves with `{doc, rev, prevRev, noop}`. Sent again with the
   * same id after a reconnect if the answer was lost (the server applies it once). Rejects with StateConflict
   * (`ifRev` is not the current revision), StaleEpoch / HandoffBusy (a fenced write), RccsError `too_large`,
   * `forbidden`, `bad_request`.
   */
  async statePatch(doc, patch, { ifRev = null, id = null, task = null, epoch = null } = {}) {
    if ((task == null) !== (epoch == null)) throw new TypeError("a fenced patch names both task and epoch");
    const envelope = { op: "state.patch", id: id ?? `patch-${this.newId()}`, doc, patch };
    if (ifRev != null) envelope.if_rev = ifRev;
    if (task != null) {
      envelope.task = task;
      envelope.epoch = epoch;
    }
    const reply = await this._requestResent(envelope);
    return { doc, rev: reply.rev, prevRev: reply.prev_rev, noop: Boolean(reply.noop) };
  }

  /**
   * Subscribe to one document (`doc`) or to every document whose name starts with `prefix`. The subscription
   * yields the current state first (a snapshot per document, or the changes since the revisions in `known`:
   * `{name: {rev, value}}`), then every change, without gaps across reconnects.
   */
  async stateSubscribe({ doc = null, prefix = null, known = null } = {}) {
    if ((doc == null) === (prefix == null)) throw new TypeError("give a doc or a prefix");
    const subscription = new StateSubscription(this, doc, prefix);
    for (const [name, { rev, value }] of Object.entries(known ?? {})) {
      subscription.revs.set(name, rev);
      subscription.values.set(name, value);
    }
    this._subscriptions.push(subscription);
    try {
      await this.request("state.subscribe", subscription._fields());
    } catch (error) {
      this._subscriptions.splice(this._subscriptions.indexOf(subscription), 1);
      throw error;
    }
    return subscription;
  }

  _resubscribeState() {
    for (const subscription of this._subscriptions) {
      this.request("state.subscribe", subscription._fields()).catch((error) => this._emit("error", error));
    }
  }

  _onState(envelope) {
    if (typeof envelope.doc !== "string") return;
    for (const subscription of this._subscriptions) {
      if (subscription.matches(envelope.doc)) subscription._onEnvelope(envelope);
    }
  }

  // ---- tasks (protocol.md section 15) -----------------------------------------

  /**
   * Own `task`: a new lease at the next epoch, or this device's own lease extended. `ttl` in ms (the server's
   * default, 30 s, when null). Rejects with TaskConflict (another device holds a live lease), HandoffBusy,
   * RccsError `too_large` / `bad_request`. Resolves with `{task, owner, epoch, expires}`.
   */
  async taskClaim(task, { ttl = null } = {}) {
    const fields = { task };
    if (ttl != null) fields.ttl = seconds(ttl);
    return leaseOf(await this.request("task.claim", fields));
  }

  /** Extend this device's lease at `epoch`; rejects with StaleEpoch when the task moved on. Resent after a reconnect. */
  async taskRenew(task, epoch, { ttl = null, timeout = this.requestTimeout } = {}) {
    const envelope = { op: "task.renew", id: `req-${this.newId()}`, task, epoch };
    if (ttl != null) envelope.ttl = seconds(ttl);
    return leaseOf(await this._requestResent(envelope, timeout));
  }

  /** Give the lease up (and stop its keepTask renewer): nobody owns the task; the next claim gets the next epoch. */
  async taskRelease(task, epoch) {
    await this.request("task.release", { task, epoch });
    const keeper = this._keepers.get(task);
    if (keeper && keeper.lease.epoch === epoch) keeper._end(null);
  }

  /** Every task of the user ever claimed (or only `task`): `{task, owner, epoch, expires, live, handoff}`. */
  async taskList(task = null) {
    const reply = await this.request("task.list", task == null ? {} : { task });
    return reply.tasks.map((entry) => ({ task: entry.task, owner: entry.owner ?? null, epoch: entry.epoch,
      expires: entry.expires, live: Boolean(entry.live), handoff: entry.handoff ?? null }));
  }

  /** Renew a lease now and then until stop() or until it is lost: see TaskKeeper. Replaces an earlier keeper. */
  keepTask(lease, { ttl = null } = {}) {
    this._keepers.get(lease.task)?._end(null);
    const keeper = new TaskKeeper(this, lease, ttl);
    this._keepers.set(lease.task, keeper);
    return keeper;
  }

  // ---- handoffs (protocol.md 15.3) ---------------------------------------------

  /**
   * Move `task` from its owner to the device `to` selects (a selector or a device id): push from the owner,
   * pull to this device, or from a third device. Resolves with `{handoff, task, owner, epoch, expires}` once
   * committed; rejects with HandoffFailed (the old owner keeps the task), RccsError `not_found` (nobody holds
   * it), HandoffBusy, `offline`, `bad_request`, or TimeoutError after `timeout` ms (it may still finish).
   */
  async handoff(task, to, { timeout = HANDOFF_TIMEOUT } = {}) {
    const requestId = `handoff-${this.newId()}`;
    const outcome = deferred();
    this._handoffRequests.set(requestId, outcome); // moved to _handoffOutcomes by handoff.started
    let handoffId = null;
    try {
      const started = await this.request("handoff.request", { task, to: typeof to === "string" ? { device: to } : to },
        { id: requestId });
      handoffId = started.handoff;
      return await withTimeout(outcome.promise, timeout,
        () => new TimeoutError(`no outcome of handoff ${handoffId} of task ${JSON.stringify(task)} in time`));
    } finally {
      this._handoffRequests.delete(requestId);
      if (handoffId != null) this._handoffOutcomes.delete(handoffId);
    }
  }

  /**
   * `callback(prepare)` (sync or async; prepare: `{handoff, task, to, epoch, deadline}`) runs when a handoff
   * asks this device to give up one of its tasks: pause at a safe point and return the checkpoint the target
   * continues from, or throw HandoffRefusal(reason). Without a callback every handoff of this device's tasks
   * is refused.
   */
  onHandoffPrepare(callback) {
    this._handoffCallbacks.prepare = callback;
  }

  /**
   * `callback(offer)` (offer: `{handoff, task, from, checkpoint, epoch, deadline}`) runs when another device's
   * task is offered to this one: return true to accept, false (or throw HandoffRefusal) to reject. Without a
   * callback every offer is rejected.
   */
  onHandoffOffer(callback) {
    this._handoffCallbacks.offer = callback;
  }

  /** `callback(result)` runs once per handoff that gave this device a task (also when the server repeats it). */
  onTaskGained(callback) {
    this._handoffCallbacks.gained = callback;
  }

  /** `callback(result)` runs when a handoff moved one of this device's tasks away: stop working on it. */
  onTaskLost(callback) {
    this._handoffCallbacks.lost = callback;
  }

  /** `callback(failure)` (a HandoffFailed) runs for every handoff this device took part in that failed. */
  onHandoffFailed(callback) {
    this._handoffCallbacks.failed = callback;
  }

  _firstTime(op, handoff) {
    const key = `${op} ${handoff}`;
    if (this._handoffsSeen.has(key)) return false;
    this._handoffsSeen.add(key);
    if (this._handoffsSeen.size > SEEN_HANDOFFS) this._handoffsSeen.delete(this._handoffsSeen.values().next().value);
    return true;
  }

  _notify(name, argument) {
    const callback = this._handoffCallbacks[name];
    if (!callback) return;
    Promise.resolve().then(() => callback(argument)).catch((error) => {
      console.error(`rccs-client: the ${name} callback failed`, error);
    });
  }

  _onHandoff(envelope) {
    const { op } = envelope;
    const handoff = String(envelope.handoff);
    const task = String(envelope.task);
    if (op === "handoff.started") {
      const outcome = this._handoffRequests.get(envelope.id);
      if (outcome) this._handoffOutcomes.set(handoff, outcome); // before any later envelope reports the outcome
      settle(this._requests.get(envelope.id), null, envelope);
    } else if (op === "handoff.prepare") {
      this._answerPrepare({ handoff, task, to: envelope.to, epoch: envelope.epoch, deadline: envelope.deadline });
    } else if (op === "handoff.offer") {
      this._answerOffer({ handoff, task, from: envelope.from, checkpoint: envelope.checkpoint ?? null,
        epoch: envelope.epoch, deadline: envelope.deadline });
    } else if (op === "handoff.committed" || op === "handoff.revoked") {
      const result = { handoff, task, owner: envelope.owner, epoch: envelope.epoch, expires: envelope.expires ?? null };
      if (op === "handoff.committed") {
        settle(this._handoffOutcomes.get(handoff), null, result);
        if (result.owner === this.deviceId && this._firstTime(op, handoff)) this._notify("gained", result);
      } else if (this._firstTime(op, handoff)) {
        const keeper = this._keepers.get(task);
        if (keeper && keeper.lease.epoch < result.epoch) {
          keeper._end(new StaleEpoch(`task ${JSON.stringify(task)} was handed off to ${result.owner}`, task,
            result.epoch, result.owner));
        }
        this._notify("lost", result);
      }
    } else if (op === "handoff.failed") {
      const failure = new HandoffFailed(handoff, task, String(envelope.reason), envelope.detail ?? null);
      settle(this._handoffOutcomes.get(handoff), failure);
      if (this._firstTime(op, handoff)) this._notify("failed", failure);
    }
  }

  async _answerPrepare(prepare) {
    const refuse = (reason) => ({ op: "handoff.refuse", handoff: prepare.handoff, reason });
    const callback = this._handoffCallbacks.prepare;
    let answer;
    if (!callback) answer = refuse("this device hands off no tasks (it has no onHandoffPrepare callback)");
    else {
      try {
        answer = { op: "handoff.prepared", handoff: prepare.handoff, checkpoint: (await callback(prepare)) ?? null };
      } catch (error) {
        answer = refuse(error instanceof HandoffRefusal ? error.reason : `${error?.name}: ${error?.message}`);
      }
    }
    try {
      this._send(answer);
    } catch (error) {
      if (!(error instanceof NotConnected)) this._send(refuse(`the checkpoint cannot be encoded: ${error.message}`));
    }
  }

  async _answerOffer(offer) {
    const callback = this._handoffCallbacks.offer;
    let accepted = false;
    let reason = "this device takes no tasks (it has no onHandoffOffer callback)";
    if (callback) {
      try {
        accepted = Boolean(await callback(offer));
        reason = "declined";
      } catch (error) {
        reason = error instanceof HandoffRefusal ? error.reason : `${error?.name}: ${error?.message}`;
      }
    }
    const answer = { op: accepted ? "handoff.accept" : "handoff.reject", handoff: offer.handoff };
    if (!accepted) answer.reason = reason;
    try {
      this._send(answer);
    } catch (error) {
      if (!(error instanceof NotConnected)) throw error;
    }
  }
}

function receiptOf(envelope) {
  return { id: envelope.id, status: String(envelope.status), device: envelope.device ?? null,
    reason: envelope.reason ?? null, fromDevice: envelope.from_device ?? null };
}

/**
 * Renews a lease (Client.keepTask) at a third of its lifetime until stop(), or until the lease is lost.
 * `lease` is the latest lease; `ended` resolves with the StaleEpoch (or other RccsError) that ended it (the
 * task was handed off, or claimed by another device after the lease ran out), or null after stop().
 */
export class TaskKeeper {
  constructor(client, lease, ttl) {
    this.client = client;
    this.lease = lease;
    this.ttl = ttl;
    this.renewals = 0;
    this._ended = deferred();
    this._timer = null;
    this._stopped = false;
    this._schedule();
  }

  get ended() {
    return this._ended.promise;
  }

  _schedule() {
    const wait = this.ttl != null ? this.ttl / 3 : Math.max(50, (this.lease.expires - this.client.serverTime()) / 3);
    this._timer = setTimeout(() => this._renew(), wait);
  }

  async _renew() {
    if (this._stopped) return;
    const remaining = this.lease.expires - this.client.serverTime();
    try {
      this.lease = await this.client.taskRenew(this.lease.task, this.lease.epoch,
        { ttl: this.ttl, timeout: Math.max(1000, remaining) });
      this.renewals += 1;
      this.client._emit("task.renewed", this.lease);
    } catch (error) {
      if (error instanceof ConnectionClosed) {
        this._end(null);
        return;
      }
      // refused for good (StaleEpoch, ...): stop; refused for now, or not connected: try again
      if (error instanceof RccsError && !TRANSIENT_ERRORS.has(error.code) && error.code !== "disconnected") {
        this._end(error);
        return;
      }
    }
    if (!this._stopped) this._schedule();
  }

  _end(reason) {
    this._stopped = true;
    clearTimeout(this._timer);
    settle(this._ended, null, reason);
    if (this.client._keepers.get(this.lease.task) === this) this.client._keepers.delete(this.lease.task);
  }

  /** Stop renewing (the lease stays until it expires; taskRelease gives it up at once). */
  stop() {
    this._end(null);
  }
}

function leaseOf(reply) {
  return { task: reply.task, owner: reply.owner, epoch: reply.epoch, expires: reply.expires };
}

/**
 * `for await (const change of subscription)`: `{doc, rev, prevRev, patch, by, value, snapshot}` for every change
 * of the subscribed documents, gap-free across reconnects. `value` is the document after the change.
 */
export class StateSubscription {
  constructor(client, doc, prefix) {
    this.client = client;
    this.doc = doc;
    this.prefix = prefix;
    this.revs = new Map(); // document -> the revision the application has seen
    this.values = new Map();
    this._queue = new AsyncQueue();
  }

  matches(doc) {
    return this.doc != null ? doc === this.doc : doc.startsWith(this.prefix);
  }

  _fields() {
    if (this.doc != null) {
      return this.revs.has(this.doc) ? { doc: this.doc, since: this.revs.get(this.doc) } : { doc: this.doc };
    }
    return { prefix: this.prefix, since: Object.fromEntries(this.revs) };
  }

  _onEnvelope(envelope) {
    const doc = envelope.doc;
    const rev = envelope.rev;
    let change;
    if (envelope.op === "state") {
      if (this.revs.get(doc) === rev) return;
      change = { doc, rev, prevRev: this.revs.get(doc) ?? 0, patch: null, by: null, value: envelope.value ?? null,
        snapshot: true };
    } else {
      if (rev <= (this.revs.get(doc) ?? 0)) return; // seen already (a repeated catch-up)
      const patch = envelope.patch ?? null;
      change = { doc, rev, prevRev: envelope.prev_rev, patch, by: envelope.by ?? null,
        value: mergePatch(this.values.get(doc) ?? null, patch), snapshot: false };
    }
    this.revs.set(doc, rev);
    this.values.set(doc, change.value);
    this._queue.push(change);
    this.client._emit("state", change);
  }

  /** The next change, within `timeout` ms (none: wait as long as it takes). */
  next({ timeout = null } = {}) {
    return this._queue.next(timeout);
  }

  async *[Symbol.asyncIterator]() {
    for (;;) {
      let change;
      try {
        change = await this._queue.next();
      } catch (error) {
        if (error instanceof ConnectionClosed) return;
        throw error;
      }
      yield change;
    }
  }

  /** Stop the subscription (`state.unsubscribe`). */
  async close() {
    const subscriptions = this.client._subscriptions;
    const at = subscriptions.indexOf(this);
    if (at >= 0) {
      subscriptions.splice(at, 1);
      const same = subscriptions.some((other) => other.doc === this.doc && other.prefix === this.prefix);
      if (!same) {
        await this.client.request("state.unsubscribe", this.doc != null ? { doc: this.doc } : { prefix: this.prefix })
          .catch(() => {});
      }
    }
    this._queue.end(new ConnectionClosed(null, "unsubscribed"));
  }
}

/**
 * Join a user as a new device with a pairing code (protocol.md section 11). Resolves with
 * `{credential, deviceId, user, client, welcome}`: `client` is connected; store `credential` (it is shown
 * once) and use it for later connections. Waits while the code needs approval (`onPending(pending)` hears
 * that). Rejects with RccsError `invalid_code`, `rate_limited`, `forbidden` (denied or not approved in time).
 */
export async function pair(url, code, device, options = {}) {
  const client = new Client(url, { ...options, token: null, credential: null, pairingCode: code, device });
  const welcome = await client.connect();
  return { credential: client.credential, deviceId: client.deviceId, user: client.user, client, welcome };
}

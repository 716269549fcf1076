// The client's core against a real server: connect, send with receipts, messages and their acks, typed
// errors, reconnect with session resume.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, ConnectionClosed, RccsError, ReceiptTimeout } from "../src/node.js";
import { WAIT, barrier, startServer } from "./server.js";

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

for (const encoding of ["msgpack", "json"]) {
  test(`connect says hello and returns the welcome (${encoding})`, async () => {
    const phone = await server.connect("alice", `hello-${encoding}`, { type: "mobile", encoding });
    const welcome = phone.welcome;
    assert.equal(welcome.op, "welcome");
    assert.equal(welcome.user, "alice");
    assert.equal(welcome.device, `hello-${encoding}`);
    assert.equal(welcome.encoding, encoding);
    assert.equal(welcome.resumed, false);
    assert.equal(typeof welcome.session, "string");
    assert.equal(phone.deviceId, `hello-${encoding}`);
    assert.ok(Math.abs(phone.serverTime() - await phone.ping()) < 5000);
  });

  test(`send with ack resolves with delivered once the receiver took the message (${encoding})`, async () => {
    const desktop = await server.connect("alice", `send-d-${encoding}`, { encoding });
    const phone = await server.connect("alice", `send-p-${encoding}`, { type: "mobile", encoding: "json" });
    const [receipts, message] = await Promise.all([
      desktop.send({ device: `send-p-${encoding}` }, "note", { text: "hi", n: [1, 2.5, null, true] }, { ack: true }),
      phone.nextMessage({ timeout: WAIT }),
    ]);
    assert.deepEqual(receipts.map((r) => [r.status, r.device]), [["delivered", `send-p-${encoding}`]]);
    assert.equal(message.from, `send-d-${encoding}`);
    assert.equal(message.type, "note");
    assert.deepEqual(message.body, { text: "hi", n: [1, 2.5, null, true] });
    assert.equal(message.ack, true);
    assert.equal(typeof message.seq, "number");
    assert.equal(typeof message.ts, "number");
  });
}

test("a message is acked when the application takes it, not when it arrives", async () => {
  const sender = await server.connect("alice", "take-s");
  const receiver = await server.connect("alice", "take-r");
  const sending = sender.send({ device: "take-r" }, "cmd", "do it", { ack: true, id: "job-1" });
  let settled = false;
  sending.then(() => { settled = true; }, () => { settled = true; });
  await barrier(sender, receiver); // the message reached the receiver; its application does not read yet
  await barrier(receiver, sender); // an ack sent on arrival would have settled the send by now
  assert.equal(await server.pending("alice", "take-r"), 1);
  assert.equal(settled, false);
  const message = await receiver.nextMessage({ timeout: WAIT });
  assert.equal(message.id, "job-1");
  const receipts = await sending;
  assert.deepEqual(receipts.map((r) => r.status), ["delivered"]);
  assert.equal(await server.pending("alice", "take-r"), 0);
});

test("onMessage acks after the callback returns", async () => {
  let release;
  const released = new Promise((resolve) => { release = resolve; });
  let handling;
  const handled = new Promise((resolve) => { handling = resolve; });
  const seen = [];
  const receiver = await server.connect("alice", "cb-r", {
    onMessage: async (message) => {
      seen.push(message.body);
      handling();
      await released;
    },
  });
  const sender = await server.connect("alice", "cb-s");
  const sending = sender.send({ device: "cb-r" }, "t", { k: 1 }, { ack: true });
  await handled;
  await receiver.ping(); // an ack written before the callback returned would reach the server ahead of this
  assert.equal(await server.pending("alice", "cb-r"), 1, "acked while the callback was still running");
  release();
  const receipts = await sending;
  assert.equal(receipts[0].status, "delivered");
  assert.deepEqual(seen, [{ k: 1 }]);
  assert.equal(await server.pending("alice", "cb-r"), 0);
});

test("messages() yields in order and ends when the client is closed", async () => {
  const a = await server.connect("alice", "iter-a");
  const b = await server.connect("alice", "iter-b");
  await a.send({ device: "iter-b" }, "t", 1);
  await a.send({ device: "iter-b" }, "t", 2);
  const received = [];
  for await (const message of b.messages()) {
    received.push(message.body);
    if (received.length === 2) await b.close();
  }
  assert.deepEqual(received, [1, 2]);
  assert.ok((await b.closed) instanceof ConnectionClosed);
});

test("a refused token rejects connect with ConnectionClosed 4401 carrying the server's error", async () => {
  const client = new Client(server.wsUrl, { token: "garbage", device: { type: "web" } });
  await assert.rejects(client.connect(), (error) => {
    assert.ok(error instanceof ConnectionClosed);
    assert.equal(error.code, 4401);
    assert.equal(error.error.code, "unauthorized");
    return true;
  });
});

test("refusals are typed errors with the server's code", async () => {
  const alice = await server.connect("alice", "err-a");
  await server.connect("bob", "err-bob");
  // without ack, send() does not wait: a refusal comes as an "error" event naming the message's id
  const noRoute = alice.nextEvent("error", { timeout: WAIT });
  await alice.send({ device: "err-nobody-online" }, "t", 1, { id: "lost-1" });
  const error = await noRoute;
  assert.ok(error instanceof RccsError);
  assert.deepEqual([error.code, error.id], ["no_route", "lost-1"]);
  await assert.rejects(alice.send({ device: "err-bob" }, "t", 1, { ack: true }),
    (error) => error instanceof RccsError && error.code === "forbidden");
  await assert.rejects(alice.send({ nothing: true }, "t", 1, { ack: true }),
    (error) => error instanceof RccsError && error.code === "bad_request");
  await assert.rejects(alice.request("no.such.op"), (error) => error.code === "unknown_op");
  // the connection stays open after refusals
  assert.equal(typeof await alice.ping(), "number");
});

test("an offline registered device gets the message through its inbox: queued, then delivered", async () => {
  const sender = await server.connect("alice", "inbox-s");
  const later = await server.connect("alice", "inbox-r");
  await later.close();
  const receipts = await sender.send({ device: "inbox-r" }, "t", "for later", { ack: true });
  assert.deepEqual(receipts.map((r) => [r.status, r.device]), [["queued", "inbox-r"]]);
  const delivered = sender.nextEvent("receipt", { timeout: WAIT, filter: (r) => r.status === "delivered" });
  const again = await server.connect("alice", "inbox-r");
  const message = await again.nextMessage({ timeout: WAIT });
  assert.equal(message.body, "for later");
  assert.equal((await delivered).device, "inbox-r");
});

test("send with ack to a receiver that never reads rejects with ReceiptTimeout carrying the receipts so far", async () => {
  const sender = await server.connect("alice", "slow-s");
  await server.connect("alice", "slow-r");
  await assert.rejects(sender.send({ device: "slow-r" }, "t", 1, { ack: true, timeout: 300 }),
    (error) => error instanceof ReceiptTimeout && Array.isArray(error.receipts));
});

test("after the server drops the connection the client reconnects and resumes its session", async () => {
  const phone = await server.connect("alice", "re-p", { backoffInitial: 10 });
  const desktop = await server.connect("alice", "re-d");
  const session = phone.welcome.session;
  const reconnected = phone.nextEvent("reconnect", { timeout: WAIT });
  await server.drop("alice", "re-p");
  const welcome = await reconnected;
  assert.equal(phone.reconnects, 1);
  assert.equal(welcome.session, session);
  assert.equal(welcome.resumed, true);
  const [receipts, message] = await Promise.all([
    desktop.send({ device: "re-p" }, "t", "after reconnect", { ack: true }),
    phone.nextMessage({ timeout: WAIT }),
  ]);
  assert.equal(message.body, "after reconnect");
  assert.equal(receipts[0].status, "delivered");
});

test("the same device connecting again replaces the older connection (4409), which stops for good", async () => {
  const first = await server.connect("alice", "twice", { backoffInitial: 10 });
  const second = await server.connect("alice", "twice");
  const closed = await first.closed;
  assert.equal(closed.code, 4409);
  assert.equal(typeof await second.ping(), "number");
  await assert.rejects(first.send({ device: "x" }, "t", 1), ConnectionClosed);
});

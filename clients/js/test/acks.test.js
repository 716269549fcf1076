// A message is acked only once the application has taken it, also when the server writes it again (after its
// ack_timeout, or after a resume) while the application has not taken it yet.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { WAIT, barrier, startServer } from "./server.js";

let server;
before(async () => { server = await startServer({ "ack-timeout": 10, "max-delivery-attempts": 5 }); });
after(async () => { await server?.stop(); });

function watch(promise) {
  const state = { done: false };
  promise.then(() => { state.done = true; }, () => { state.done = true; });
  return state;
}

/** Push the server's retry sweep past the deadline (ack_timeout 10 s, +20 % jitter); wait for the repeat. */
async function writtenAgain(receiver, pastMs = 13000) {
  const before = receiver.duplicates;
  await server.retry(pastMs);
  await barrier(receiver);
  assert.equal(receiver.duplicates, before + 1, "the server did not write the message again");
}

test("a repeat of a message the application has not taken is not acked", async () => {
  const laptop = await server.connect("alice", "rep-laptop");
  const phone = await server.connect("alice", "rep-phone", { type: "mobile" });
  const sending = phone.send({ device: "rep-laptop" }, "cmd", "do it", { ack: true, id: "job" });
  const sent = watch(sending);
  await barrier(phone, laptop); // the message reached the laptop; its application does not read yet
  await writtenAgain(laptop);
  await barrier(laptop, phone); // an ack the laptop sent for the repeat would have settled the send by now
  assert.equal(sent.done, false);
  const taken = await laptop.nextMessage({ timeout: WAIT });
  assert.deepEqual([taken.id, taken.body], ["job", "do it"]);
  assert.deepEqual((await sending).map((r) => [r.status, r.device]), [["delivered", "rep-laptop"]]);
  assert.equal(laptop._inbox.size, 0, "the repeat was handed to the application");
});

test("a repeat while onMessage runs waits for it, and a failed callback gets another try", async () => {
  const calls = [];
  let release;
  const released = new Promise((resolve) => { release = resolve; });
  const laptop = await server.connect("alice", "cbrep-laptop", {
    onMessage: async (message) => {
      calls.push(message.body);
      if (calls.length === 1) throw new Error("the application failed to take it");
      await released;
    },
  });
  const phone = await server.connect("alice", "cbrep-phone", { type: "mobile" });
  const originalError = console.error;
  console.error = () => {}; // the failing callback is logged; not noise in the test output
  try {
    const sending = phone.send({ device: "cbrep-laptop" }, "cmd", "do it", { ack: true, id: "job" });
    const sent = watch(sending);
    await barrier(phone, laptop);
    assert.deepEqual(calls, ["do it"]); // failed: not acked
    await server.retry(13000); // the next write is the application's second try; it blocks in the callback
    await barrier(laptop);
    assert.deepEqual(calls, ["do it", "do it"]);
    await writtenAgain(laptop, 60000); // a third write (backoff doubled) while the callback runs
    await barrier(laptop, phone);
    assert.equal(sent.done, false);
    release();
    assert.deepEqual((await sending).map((r) => [r.status, r.device]), [["delivered", "cbrep-laptop"]]);
    assert.deepEqual(calls, ["do it", "do it"]);
  } finally {
    console.error = originalError;
  }
});

test("a repeat after a resume of a message not taken yet is not acked", async () => {
  const laptop = await server.connect("alice", "res-laptop", { backoffInitial: 10 });
  const phone = await server.connect("alice", "res-phone", { type: "mobile" });
  const session = laptop.welcome.session;
  const sending = phone.send({ device: "res-laptop" }, "cmd", "run", { ack: true, id: "r1" });
  const sent = watch(sending);
  await barrier(phone, laptop);
  const reconnected = laptop.nextEvent("reconnect", { timeout: WAIT });
  laptop._ws.terminate(); // a lost network: the session waits to be resumed
  const welcome = await reconnected;
  assert.equal(welcome.resumed, true);
  assert.equal(welcome.session, session);
  await barrier(laptop); // the unacked message came again, with the same seq
  assert.equal(laptop.duplicates, 1);
  await barrier(laptop, phone);
  assert.equal(sent.done, false);
  const taken = await laptop.nextMessage({ timeout: WAIT });
  assert.equal(taken.id, "r1");
  assert.deepEqual((await sending).map((r) => [r.status, r.device]), [["delivered", "res-laptop"]]);
});

test("a message taken before the connection dropped is acked again when the resumed session repeats it", async () => {
  const laptop = await server.connect("alice", "took-laptop", { backoffInitial: 10, autoAck: false });
  const phone = await server.connect("alice", "took-phone", { type: "mobile" });
  const sending = phone.send({ device: "took-laptop" }, "cmd", "run", { ack: true, id: "t1" });
  const taken = await laptop.nextMessage({ timeout: WAIT }); // taken, but (autoAck off) its ack never went out
  assert.equal(taken.id, "t1");
  laptop.autoAck = true;
  const reconnected = laptop.nextEvent("reconnect", { timeout: WAIT });
  laptop._ws.terminate();
  await reconnected;
  assert.deepEqual((await sending).map((r) => [r.status, r.device]), [["delivered", "took-laptop"]]);
  assert.equal(laptop.duplicates, 1);
});

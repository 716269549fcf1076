// Handoffs of tasks between JS devices (protocol.md 15.3), decided by onHandoffPrepare / onHandoffOffer, and
// keepTask renewing a lease until it is handed away; against a real server.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { HandoffBusy, HandoffFailed, HandoffRefusal, StaleEpoch } from "../src/node.js";
import { AsyncQueue } from "../src/queue.js";
import { WAIT, startServer } from "./server.js";

let server;
// short enough that a handoff nobody answers fails quickly, long enough for every answer in these tests
before(async () => { server = await startServer({ "handoff-prepare-timeout": 5, "handoff-accept-timeout": 5 }); });
after(async () => { await server?.stop(); });

const collect = (queue) => (item) => queue.push(item);

for (const encoding of ["msgpack", "json"]) {
  test(`a handoff pushed by the owner moves the task with its checkpoint (${encoding})`, async () => {
    const ide = await server.connect(`push-${encoding}`, `push-ide-${encoding}`, { encoding });
    const phone = await server.connect(`push-${encoding}`, `push-phone-${encoding}`, { type: "mobile", encoding });
    const prepares = new AsyncQueue();
    const offers = new AsyncQueue();
    const gained = new AsyncQueue();
    const lost = new AsyncQueue();
    ide.onHandoffPrepare((prepare) => {
      prepares.push(prepare);
      return { step: 3, log: ["read", "edit"] };
    });
    phone.onHandoffOffer(async (offer) => {
      offers.push(offer);
      return true;
    });
    phone.onTaskGained(collect(gained));
    ide.onTaskLost(collect(lost));
    await ide.taskClaim("agent");

    const result = await ide.handoff("agent", `push-phone-${encoding}`);

    assert.deepEqual([result.task, result.owner, result.epoch], ["agent", `push-phone-${encoding}`, 2]);
    const prepare = await prepares.next(WAIT);
    assert.deepEqual([prepare.handoff, prepare.task, prepare.to, prepare.epoch],
      [result.handoff, "agent", `push-phone-${encoding}`, 1]);
    const offer = await offers.next(WAIT);
    assert.deepEqual([offer.from, offer.checkpoint, offer.epoch], [`push-ide-${encoding}`, { step: 3, log: ["read", "edit"] }, 2]);
    assert.deepEqual(await gained.next(WAIT), result);
    const revoked = await lost.next(WAIT);
    assert.deepEqual([revoked.handoff, revoked.owner, revoked.epoch], [result.handoff, `push-phone-${encoding}`, 2]);
    await assert.rejects(ide.statePatch("user/agent", { step: 4 }, { task: "agent", epoch: 1 }), StaleEpoch);
    await phone.statePatch("user/agent", { step: 4 }, { task: "agent", epoch: 2 });
  });
}

test("a handoff pulled by the target; the requester and new owner hears the commit once", async () => {
  const ide = await server.connect("pull", "pull-ide");
  const phone = await server.connect("pull", "pull-phone", { type: "mobile", encoding: "json" });
  const gained = new AsyncQueue();
  ide.onHandoffPrepare(() => ({ step: 7 }));
  phone.onHandoffOffer((offer) => offer.checkpoint.step === 7);
  phone.onTaskGained(collect(gained));
  await ide.taskClaim("agent");
  const result = await phone.handoff("agent", { device: "pull-phone" });
  assert.deepEqual([result.owner, result.epoch], ["pull-phone", 2]);
  assert.equal((await gained.next(WAIT)).handoff, result.handoff);
  const [status] = await phone.taskList();
  assert.deepEqual([status.owner, status.epoch, status.handoff], ["pull-phone", 2, null]);
  assert.equal(gained.size, 0);
});

test("a refusal in onHandoffPrepare fails the handoff with its reason, and the owner keeps the task", async () => {
  const ide = await server.connect("refuse", "refuse-ide");
  const phone = await server.connect("refuse", "refuse-phone", { type: "mobile" });
  const failures = new AsyncQueue();
  ide.onHandoffPrepare(() => { throw new HandoffRefusal("in the middle of a build"); });
  ide.onHandoffFailed(collect(failures));
  phone.onHandoffOffer(() => true);
  await ide.taskClaim("agent");
  await assert.rejects(phone.handoff("agent", "refuse-phone"), (error) => {
    assert.ok(error instanceof HandoffFailed);
    assert.deepEqual([error.code, error.reason, error.detail], ["handoff_failed", "refused", "in the middle of a build"]);
    return true;
  });
  assert.equal((await failures.next(WAIT)).reason, "refused");
  assert.deepEqual((await ide.taskList()).map((s) => [s.owner, s.epoch]), [["refuse-ide", 1]]);
});

test("without callbacks prepare is refused and an offer rejected", async () => {
  const ide = await server.connect("none", "none-ide");
  const phone = await server.connect("none", "none-phone", { type: "mobile" });
  await ide.taskClaim("agent");
  await assert.rejects(phone.handoff("agent", "none-phone"),
    (error) => error instanceof HandoffFailed && error.reason === "refused" && error.detail.includes("onHandoffPrepare"));
  ide.onHandoffPrepare(() => null);
  await assert.rejects(ide.handoff("agent", "none-phone"),
    (error) => error instanceof HandoffFailed && error.reason === "rejected" && error.detail.includes("onHandoffOffer"));
  assert.deepEqual((await phone.taskList()).map((s) => [s.owner, s.epoch]), [["none-ide", 1]]);
});

test("a second handoff or a release while one is open is HandoffBusy", async () => {
  const ide = await server.connect("busy", "busy-ide");
  const phone = await server.connect("busy", "busy-phone", { type: "mobile" });
  const watch = await server.connect("busy", "busy-watch", { type: "watch" });
  let asked;
  const askedPromise = new Promise((resolve) => { asked = resolve; });
  let goOn;
  const goOnPromise = new Promise((resolve) => { goOn = resolve; });
  ide.onHandoffPrepare(async () => {
    asked();
    await goOnPromise;
    return { step: 1 };
  });
  phone.onHandoffOffer(() => true);
  await ide.taskClaim("agent", { ttl: 60000 });
  const first = phone.handoff("agent", "busy-phone");
  await askedPromise;
  const [status] = await watch.taskList();
  await assert.rejects(watch.handoff("agent", "busy-watch"), (error) => {
    assert.ok(error instanceof HandoffBusy);
    assert.deepEqual([error.task, error.handoff], ["agent", status.handoff]);
    return true;
  });
  await assert.rejects(ide.taskRelease("agent", 1), HandoffBusy);
  goOn();
  assert.equal((await first).handoff, status.handoff);
});

test("keepTask renews the lease until the task is handed away, then ends with StaleEpoch", async () => {
  const ide = await server.connect("keep", "keep-ide");
  const phone = await server.connect("keep", "keep-phone", { type: "mobile" });
  ide.onHandoffPrepare(() => null);
  phone.onHandoffOffer(() => true);
  // renewals every ttl/3; leases long enough (3 s) for a loaded machine's stalls
  const lease = await ide.taskClaim("agent", { ttl: 3000 });
  const keeper = ide.keepTask(lease, { ttl: 3000 });
  const renewed = await ide.nextEvent("task.renewed", { timeout: WAIT });
  assert.ok(renewed.epoch === 1 && renewed.expires > lease.expires);
  assert.deepEqual(keeper.lease, renewed);
  await ide.handoff("agent", "keep-phone");
  const ended = await keeper.ended;
  assert.ok(ended instanceof StaleEpoch);
  assert.deepEqual([ended.owner, ended.epoch], ["keep-phone", 2]);
});

test("handoff.committed repeated by the server after a reconnect reaches the application once", async () => {
  const ide = await server.connect("again", "again-ide");
  const phone = await server.connect("again", "again-phone", { type: "mobile", backoffInitial: 10 });
  const gained = new AsyncQueue();
  ide.onHandoffPrepare(() => ({ step: 2 }));
  phone.onHandoffOffer(() => true);
  phone.onTaskGained(collect(gained));
  const committedSeen = [];
  const receive = phone._onHandoff.bind(phone);
  phone._onHandoff = (envelope) => { // counts what arrives on the wire, to show the server did repeat it
    if (envelope.op === "handoff.committed") committedSeen.push(envelope.handoff);
    receive(envelope);
  };
  await ide.taskClaim("agent");
  const result = await ide.handoff("agent", "again-phone");
  assert.equal((await gained.next(WAIT)).handoff, result.handoff);
  const reconnected = phone.nextEvent("reconnect", { timeout: WAIT });
  phone._ws.terminate(); // dropped before the phone used its new lease
  await reconnected;
  await phone.taskList(); // answered after the server's repeated notice (same connection, in order)
  assert.deepEqual(committedSeen, [result.handoff, result.handoff]);
  assert.equal(gained.size, 0);
});

// State documents (get, patch, subscribe with catch-up across reconnects) and task leases, against a real server.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { RccsError, StaleEpoch, StateConflict, TaskConflict } from "../src/node.js";
import { WAIT, startServer } from "./server.js";

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

for (const encoding of ["msgpack", "json"]) {
  test(`state get and patch with revisions; a stale ifRev is a StateConflict with the current value (${encoding})`, async () => {
    const phone = await server.connect(`st-${encoding}`, `st-phone-${encoding}`, { encoding });
    assert.deepEqual(await phone.stateGet("user/draft"), { doc: "user/draft", rev: 0, value: null });
    const first = await phone.statePatch("user/draft", { text: "Dear Bob", to: ["bob"] });
    assert.deepEqual(first, { doc: "user/draft", rev: 1, prevRev: 0, noop: false });
    const second = await phone.statePatch("user/draft", { to: null, n: 2 }, { ifRev: 1 });
    assert.equal(second.rev, 2);
    assert.deepEqual((await phone.stateGet("user/draft")).value, { text: "Dear Bob", n: 2 });
    assert.equal((await phone.statePatch("user/draft", { n: 2 })).noop, true);
    await assert.rejects(phone.statePatch("user/draft", { text: "late" }, { ifRev: 1 }), (error) => {
      assert.ok(error instanceof StateConflict);
      assert.deepEqual([error.code, error.rev, error.value], ["conflict", 2, { text: "Dear Bob", n: 2 }]);
      return true;
    });
    await assert.rejects(phone.statePatch("device/someone-else/x", { a: 1 }), (error) => error.code === "forbidden");
    await assert.rejects(phone.statePatch("nope", { a: 1 }), (error) => error.code === "bad_request");
  });
}

test("a subscription starts with a snapshot, then every change with the merged value", async () => {
  const phone = await server.connect("sub", "sub-phone");
  const desktop = await server.connect("sub", "sub-desktop", { encoding: "json" });
  await desktop.statePatch("user/doc", { a: 1 });
  const subscription = await phone.stateSubscribe({ doc: "user/doc" });
  const snapshot = await subscription.next({ timeout: WAIT });
  assert.deepEqual([snapshot.snapshot, snapshot.rev, snapshot.value], [true, 1, { a: 1 }]);
  await desktop.statePatch("user/doc", { b: { c: 2 } });
  const change = await subscription.next({ timeout: WAIT });
  assert.deepEqual([change.snapshot, change.rev, change.prevRev, change.by], [false, 2, 1, "sub-desktop"]);
  assert.deepEqual(change.patch, { b: { c: 2 } });
  assert.deepEqual(change.value, { a: 1, b: { c: 2 } });
  await subscription.close();
  await desktop.statePatch("user/doc", { z: 1 });
  await assert.rejects(subscription.next({ timeout: 200 }));
});

test("a prefix subscription catches up from known revisions, and after a reconnect with what it missed", async () => {
  const writer = await server.connect("catch", "catch-writer");
  await writer.statePatch("user/a", { v: 1 });
  await writer.statePatch("user/a", { v: 2 });
  const reader = await server.connect("catch", "catch-reader", { backoffInitial: 10 });
  const subscription = await reader.stateSubscribe({ prefix: "user/", known: { "user/a": { rev: 1, value: { v: 1 } } } });
  const caughtUp = await subscription.next({ timeout: WAIT });
  assert.deepEqual([caughtUp.snapshot, caughtUp.rev, caughtUp.value], [false, 2, { v: 2 }]);
  // The connection drops; changes made meanwhile come after the reconnect, none twice, none lost.
  const reconnected = reader.nextEvent("reconnect", { timeout: WAIT });
  const closedAt = reader._conn.lost.promise;
  reader._ws.terminate();
  await closedAt;
  await writer.statePatch("user/a", { v: 3 });
  await writer.statePatch("user/b", { w: 1 });
  await reconnected;
  const seen = [];
  while (seen.length < 2) {
    const change = await subscription.next({ timeout: WAIT });
    seen.push([change.doc, change.rev, change.value]);
  }
  seen.sort();
  assert.deepEqual(seen, [["user/a", 3, { v: 3 }], ["user/b", 1, { w: 1 }]]);
  await writer.statePatch("user/a", { v: 4 });
  const live = await subscription.next({ timeout: WAIT });
  assert.deepEqual([live.doc, live.rev, live.prevRev], ["user/a", 4, 3]);
});

for (const encoding of ["msgpack", "json"]) {
  test(`task claim, renew, release and list (${encoding})`, async () => {
    const ide = await server.connect(`task-${encoding}`, `ide-${encoding}`, { encoding });
    const lease = await ide.taskClaim("agent", { ttl: 60000 });
    assert.deepEqual([lease.task, lease.owner, lease.epoch], ["agent", `ide-${encoding}`, 1]);
    const renewed = await ide.taskRenew("agent", lease.epoch, { ttl: 120000 });
    assert.ok(renewed.epoch === 1 && renewed.expires > lease.expires);
    assert.equal((await ide.taskClaim("agent")).epoch, 1); // the holder claiming again keeps its epoch
    assert.deepEqual(await ide.taskList(), [{ task: "agent", owner: `ide-${encoding}`, epoch: 1,
      expires: (await ide.taskList("agent"))[0].expires, live: true, handoff: null }]);
    await ide.taskRelease("agent", 1);
    const [status] = await ide.taskList("agent");
    assert.deepEqual([status.owner, status.live], [null, false]);
    assert.equal((await ide.taskClaim("agent")).epoch, 2);
  });
}

test("a held task is a TaskConflict naming the holder; an old epoch a StaleEpoch; fenced patches obey the epoch", async () => {
  const ide = await server.connect("fence", "fence-ide");
  const phone = await server.connect("fence", "fence-phone", { type: "mobile", encoding: "json" });
  const lease = await ide.taskClaim("agent");
  await assert.rejects(phone.taskClaim("agent"), (error) => {
    assert.ok(error instanceof TaskConflict && error instanceof RccsError);
    assert.deepEqual([error.code, error.task, error.owner, error.epoch, error.expires],
      ["conflict", "agent", "fence-ide", 1, lease.expires]);
    return true;
  });
  await ide.statePatch("user/agent", { step: 1 }, { task: "agent", epoch: 1 });
  await ide.taskRelease("agent", 1);
  await phone.taskClaim("agent");
  await assert.rejects(ide.taskRenew("agent", 1), (error) => {
    assert.ok(error instanceof StaleEpoch);
    assert.deepEqual([error.code, error.task, error.epoch, error.owner], ["stale_epoch", "agent", 2, "fence-phone"]);
    return true;
  });
  await assert.rejects(ide.statePatch("user/agent", { step: 2 }, { task: "agent", epoch: 1 }), StaleEpoch);
  assert.deepEqual((await ide.stateGet("user/agent")).value, { step: 1 });
});

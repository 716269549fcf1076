// A JS device speaking msgpack, a JS device speaking JSON and a Python device (the repo's rccs.client) of one
// user talk to one another through a real server: messages with receipts, calls both ways, state.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { WAIT, startServer } from "./server.js";

let server;
before(async () => { server = await startServer(); });
after(async () => {
  await server?.command("py_close", { device: "py" }).catch(() => {});
  await server?.stop();
});

test("msgpack JS, JSON JS and Python devices exchange messages, receipts and calls", async () => {
  const packed = await server.connect("ivy", "js-msgpack", { encoding: "msgpack" });
  const texted = await server.connect("ivy", "js-json", { encoding: "json" });
  await server.command("py_connect", { user: "ivy", device: "py", encoding: "msgpack" });
  const body = { text: "héllo ✓", list: [1, -2, 3.25, null, false], nested: { big: 2 ** 40 } };

  // JS (msgpack) -> Python and JS (JSON), one send with ack to both
  const [receipts, atJson, atPython] = await Promise.all([
    packed.send({ devices: ["js-json", "py"] }, "note", body, { ack: true }),
    texted.nextMessage({ timeout: WAIT }),
    server.command("py_next", { device: "py" }),
  ]);
  assert.deepEqual(receipts.map((r) => [r.status, r.device]).sort(), [["delivered", "js-json"], ["delivered", "py"]]);
  assert.deepEqual([atJson.from, atJson.type, atJson.body], ["js-msgpack", "note", body]);
  assert.deepEqual([atPython.from, atPython.type, atPython.body], ["js-msgpack", "note", body]);

  // Python -> both JS devices
  const [pyReceipts, fromPyPacked, fromPyTexted] = await Promise.all([
    server.command("py_send", { device: "py", to: { type: "desktop" }, type: "reply", body: { ok: true }, ack: true }),
    packed.nextMessage({ timeout: WAIT }),
    texted.nextMessage({ timeout: WAIT }),
  ]);
  assert.deepEqual(pyReceipts.map((r) => [r.status, r.device]).sort(), [["delivered", "js-json"], ["delivered", "js-msgpack"]]);
  assert.deepEqual([fromPyPacked.from, fromPyPacked.body], ["py", { ok: true }]);
  assert.deepEqual([fromPyTexted.from, fromPyTexted.body], ["py", { ok: true }]);

  // JS (JSON) -> Python
  const [toPy, atPy] = await Promise.all([
    texted.send({ device: "py" }, "from-json", { pi: 3.14159, neg: -7 }, { ack: true }),
    server.command("py_next", { device: "py" }),
  ]);
  assert.deepEqual(toPy.map((r) => [r.status, r.device]), [["delivered", "py"]]);
  assert.deepEqual([atPy.from, atPy.type, atPy.body], ["js-json", "from-json", { pi: 3.14159, neg: -7 }]);

  // JS (JSON) -> JS (msgpack); binary data in a msgpack body reaches a JSON device as base64 (protocol.md 6)
  const [jsonReceipts, atPacked] = await Promise.all([
    texted.send({ device: "js-msgpack" }, "back", [1, "two"], { ack: true }),
    packed.nextMessage({ timeout: WAIT }),
  ]);
  assert.deepEqual(jsonReceipts.map((r) => r.status), ["delivered"]);
  assert.deepEqual(atPacked.body, [1, "two"]);
  const [, binary] = await Promise.all([
    packed.send({ device: "js-json" }, "blob", { data: new Uint8Array([1, 2, 3, 255]) }, { ack: true }),
    texted.nextMessage({ timeout: WAIT }),
  ]);
  assert.deepEqual(binary.body, { data: "AQID/w==" });

  // calls: JS -> Python, Python -> JS (JSON), JS (JSON) -> JS (msgpack)
  assert.deepEqual(await texted.call("py", "py.echo", { n: 1.5 }), { n: 1.5 });
  texted.onCall("js.add", ({ a, b }) => a + b);
  packed.onCall("js.upper", (text) => text.toUpperCase());
  assert.equal(await server.command("py_call", { device: "py", to: { device: "js-json" }, method: "js.add",
    params: { a: 2, b: 40 } }), 42);
  assert.equal(await texted.call("js-msgpack", "js.upper", "abc"), "ABC");

  // state written by one encoding is read by the other
  await packed.statePatch("user/shared", { by: "msgpack", list: [1, 2] });
  const subscription = await texted.stateSubscribe({ doc: "user/shared" });
  assert.deepEqual((await subscription.next({ timeout: WAIT })).value, { by: "msgpack", list: [1, 2] });
  await packed.statePatch("user/shared", { by: null });
  assert.deepEqual((await subscription.next({ timeout: WAIT })).value, { list: [1, 2] });
});

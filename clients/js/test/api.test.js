// Calls, presence, devices, pairing: the client's API beyond messages, against a real server.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, ConnectionClosed, RccsError, pair } from "../src/node.js";
import { WAIT, startServer } from "./server.js";

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

test("call reaches onCall of the target and resolves with its result; errors carry codes", async () => {
  const phone = await server.connect("alice", "rpc-phone", { type: "mobile", encoding: "json" });
  const desktop = await server.connect("alice", "rpc-desktop");
  phone.onCall("battery.level", async (params, context) => {
    assert.equal(context.from, "rpc-desktop");
    return { level: 87, unit: params.unit };
  });
  phone.onCall("fails", () => { throw new RccsError("not_supported", "no battery here"); });
  phone.onCall("crashes", () => { throw new Error("boom"); });
  assert.deepEqual(await desktop.call({ type: "mobile" }, "battery.level", { unit: "%" }), { level: 87, unit: "%" });
  assert.deepEqual(await desktop.call("rpc-phone", "battery.level", { unit: "mAh" }), { level: 87, unit: "mAh" });
  const codeOf = (promise) => promise.then(() => "resolved", (error) => error.code);
  assert.equal(await codeOf(desktop.call("rpc-phone", "fails")), "not_supported");
  assert.equal(await codeOf(desktop.call("rpc-phone", "crashes")), "handler_error");
  assert.equal(await codeOf(desktop.call("rpc-phone", "no.such.method")), "unknown_method");
  assert.equal(await codeOf(desktop.call({ type: "tablet" }, "battery.level")), "offline");
  phone.onCall("slow", () => new Promise(() => {}));
  assert.equal(await codeOf(desktop.call("rpc-phone", "slow", null, { timeout: 200 })), "timeout");
});

test("presence events follow another device online, away, offline", async () => {
  const watcher = await server.connect("carol", "pres-watcher");
  const online = watcher.nextEvent("presence", { timeout: WAIT, filter: (e) => e.device === "pres-phone" });
  const phone = await server.connect("carol", "pres-phone", { type: "mobile" });
  assert.equal((await online).status, "online");
  const away = watcher.nextEvent("presence", { timeout: WAIT, filter: (e) => e.device === "pres-phone" });
  await phone.setPresence("away");
  assert.equal((await away).status, "away");
  const offline = watcher.nextEvent("presence", { timeout: WAIT, filter: (e) => e.device === "pres-phone" });
  await phone.close();
  const event = await offline;
  assert.equal(event.status, "offline");
  assert.equal(typeof event.last_seen, "number");
});

test("devices lists the user's devices; updateDevice renames another; revokeDevice ends it for good", async () => {
  const desktop = await server.connect("dave", "dev-desktop");
  const phone = await server.connect("dave", "dev-phone", { type: "mobile", backoffInitial: 10 });
  await phone.updateDevice({ capabilities: ["camera"], name: "Phone" });
  const devices = await desktop.devices();
  const byId = Object.fromEntries(devices.map((d) => [d.id, d]));
  assert.deepEqual(Object.keys(byId).sort(), ["dev-desktop", "dev-phone"]);
  assert.equal(byId["dev-phone"].type, "mobile");
  assert.deepEqual(byId["dev-phone"].capabilities, ["camera"]);
  assert.equal(byId["dev-phone"].status, "online");
  const renamed = await desktop.updateDevice({ name: "Dave's phone" }, { device: "dev-phone" });
  assert.equal(renamed.name, "Dave's phone");
  const revoked = desktop.nextEvent("presence", { timeout: WAIT, filter: (e) => e.status === "revoked" });
  await desktop.revokeDevice("dev-phone");
  assert.equal((await revoked).device, "dev-phone");
  const closed = await phone.closed;
  assert.ok(closed instanceof ConnectionClosed);
  assert.equal(closed.code, 4410);
  assert.deepEqual((await desktop.devices()).map((d) => d.id), ["dev-desktop"]);
  await assert.rejects(desktop.revokeDevice("dev-phone"), (error) => error.code === "not_found");
});

test("sessions lists the user's sessions, the asking one marked current", async () => {
  const one = await server.connect("erin", "ses-one");
  await server.connect("erin", "ses-two");
  const sessions = await one.sessions();
  const current = sessions.filter((s) => s.current);
  assert.deepEqual(current.map((s) => [s.device, s.session]), [["ses-one", one.sessionId]]);
  assert.ok(sessions.some((s) => s.device === "ses-two" && s.connected));
});

test("pair with a code from another device: a credential that connects again", async () => {
  const desktop = await server.connect("frank", "pair-desktop");
  const joined = desktop.nextEvent("pair.joined", { timeout: WAIT });
  const { code, uri } = await desktop.createPairingCode();
  assert.match(code, /^[0-9A-Z]{4}-[0-9A-Z]{4}$/);
  assert.ok(uri.includes(code));
  const paired = await pair(server.wsUrl, code.toLowerCase().replace("-", " "), { type: "web", name: "Browser" });
  server.track(paired.client);
  assert.match(paired.credential, /^rccs_/);
  assert.equal(paired.user, "frank");
  assert.equal(paired.welcome.device, paired.deviceId);
  assert.equal((await joined).device.id, paired.deviceId);
  await paired.client.close();
  const again = server.track(new Client(server.wsUrl, { credential: paired.credential }));
  const welcome = await again.connect();
  assert.deepEqual([welcome.user, welcome.device], ["frank", paired.deviceId]);
  // the code worked once
  await assert.rejects(pair(server.wsUrl, code, { type: "web" }), (error) => error.code === "invalid_code");
});

test("a code that needs approval waits until a device approves, or is refused when denied", async () => {
  const desktop = await server.connect("gina", "appr-desktop");
  const { code } = await desktop.createPairingCode({ approve: true });
  const requested = desktop.nextEvent("pair.request", { timeout: WAIT });
  let pending = null;
  const pairing = pair(server.wsUrl, code, { type: "web", name: "Laptop" }, { onPending: (p) => { pending = p; } });
  const request = await requested;
  assert.equal(request.device.name, "Laptop");
  assert.equal(pending?.request, request.request);
  await desktop.approvePairing(request.request);
  const paired = await pairing;
  server.track(paired.client);
  assert.equal(paired.user, "gina");

  const second = await desktop.createPairingCode({ approve: true });
  const asked = desktop.nextEvent("pair.request", { timeout: WAIT });
  const refused = assert.rejects(pair(server.wsUrl, second.code, { type: "web" }), (error) => error.code === "forbidden");
  await desktop.denyPairing((await asked).request);
  await refused;
  await assert.rejects(desktop.approvePairing("no-such-request"), (error) => error.code === "not_found");
});

test("a pairing code from the command line's way of making one works for the first device", async () => {
  const code = await server.code("henry");
  const paired = await pair(server.wsUrl, code, { type: "web" });
  server.track(paired.client);
  assert.equal(paired.user, "henry");
  await assert.rejects(pair(server.wsUrl, "AAAA-AAAA", { type: "web" }), (error) => error.code === "invalid_code");
});

test("a firstAck message taken by one device is retracted from the other, which hears retract", async () => {
  const sender = await server.connect("kim", "fa-sender");
  const one = await server.connect("kim", "fa-one", { type: "worker" });
  const other = await server.connect("kim", "fa-other", { type: "worker" });
  const sending = sender.send({ type: "worker" }, "job", { n: 1 }, { ack: true, firstAck: true, id: "job-1" });
  const retracted = other.nextEvent("retract", { timeout: WAIT });
  const taken = await one.nextMessage({ timeout: WAIT });
  assert.equal(taken.id, "job-1");
  const retract = await retracted;
  assert.deepEqual([retract.id, retract.from], ["job-1", "fa-sender"]);
  const receipts = await sending;
  assert.deepEqual(receipts.map((r) => [r.status, r.device]).sort(), [["delivered", "fa-one"], ["retracted", "fa-other"]]);
});

test("refresh extends the session with a fresh token; revokeSession ends another device's session", async () => {
  const phone = await server.connect("lena", "ref-phone");
  const other = await server.connect("lena", "ref-other", { backoffInitial: 10 });
  const before = phone.welcome.expires_at;
  const expires = await phone.refresh({ token: await server.token("lena", "ref-phone") });
  assert.ok(expires >= before);
  await assert.rejects(phone.refresh({ token: await server.token("lena", "ref-other") }),
    (error) => error.code === "forbidden");
  await phone.revokeSession(other.sessionId);
  assert.equal((await other.closed).code, 4410);
  await assert.rejects(phone.revokeSession("no-such-session"), (error) => error.code === "not_found");
});

// The web console (/console/) in headless Chromium against a real server: it pairs itself by code, shows the
// devices with live presence and counts, pairs a new device by the code it shows (approved in the page),
// renames and revokes devices, lists the messages sent to it, and requests nothing outside this machine.
// Chromium: $CHROMIUM, else chromium (Debian's package) or chromium-browser on PATH; without one the test is
// skipped, saying so.
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { delimiter, join } from "node:path";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

import { Client, pair } from "../../src/node.js";
import { REPO, startServer } from "../server.js";

const onPath = (name) => (process.env.PATH ?? "").split(delimiter).map((dir) => join(dir, name)).find(existsSync);
const CHROMIUM = process.env.CHROMIUM || onPath("chromium") || onPath("chromium-browser") || "/usr/bin/chromium";
const SKIP = existsSync(CHROMIUM) ? false : `no Chromium at ${CHROMIUM} (apt-get install chromium): browser test skipped`;
const UI_WAIT = 10000; // ms the page may take to show an expected state
// docs/console.png is this test's screenshot; RCCS_CONSOLE_SCREENSHOT=docs/console.png writes it again.
const SCREENSHOT = process.env.RCCS_CONSOLE_SCREENSHOT;

let server;
let browser;
before(async () => {
  if (SKIP) return;
  server = await startServer();
  // Playwright gives each launch a fresh, temporary profile (its own --user-data-dir).
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

const isLocal = (url) => ["127.0.0.1", "localhost", "[::1]"].includes(new URL(url).hostname);

test("the console pairs by code, follows presence, pairs, renames and revokes devices", { skip: SKIP }, async () => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const outside = [];
  await context.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith("data:") || isLocal(url)) return route.continue();
    outside.push(url);
    return route.abort();
  });
  const page = await context.newPage();
  page.on("websocket", (socket) => { if (!isLocal(socket.url())) outside.push(socket.url()); });
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(error.message));
  page.on("console", (message) => { // CSP violations and failed loads show up here
    if (message.type() === "error") pageErrors.push(message.text());
  });

  const desktop = server.track(new Client(server.wsUrl, {
    token: await server.token("zoe", "zoe-desktop"), device: { type: "desktop", capabilities: ["shell", "files"] } }));
  await desktop.connect();
  const code = await server.code("zoe");
  await page.goto(`${server.httpUrl}/console/#code=${code}`);
  const row = (device) => page.locator(`#devices tr[data-device="${device}"]`);

  // paired: the console is a device of type web, its credential kept in the browser
  await page.locator("#connection.up").waitFor({ timeout: UI_WAIT });
  const stored = JSON.parse(await page.evaluate(() => localStorage.getItem("rccs-console")));
  assert.match(stored.credential, /^rccs_/);
  assert.equal(stored.user, "zoe");
  assert.equal(new URL(page.url()).hash, "", "the used code stays in the address bar");
  const consoleId = stored.deviceId;
  await row(consoleId).locator(".type", { hasText: "web" }).waitFor({ timeout: UI_WAIT });

  // presence as it changes: away and back, a new device online, then offline
  await row("zoe-desktop").locator(".status", { hasText: "online" }).waitFor({ timeout: UI_WAIT });
  assert.equal(await row("zoe-desktop").locator(".caps").textContent(), "shell, files");
  assert.equal(await row("zoe-desktop").locator(".type").textContent(), "desktop");
  await desktop.setPresence("away");
  await row("zoe-desktop").locator(".status", { hasText: "away" }).waitFor({ timeout: UI_WAIT });
  await desktop.setPresence("online");
  await row("zoe-desktop").locator(".status", { hasText: "online" }).waitFor({ timeout: UI_WAIT });
  const phone = server.track(new Client(server.wsUrl, { token: await server.token("zoe", "zoe-phone"),
    device: { type: "mobile" } }));
  await phone.connect();
  await row("zoe-phone").locator(".status", { hasText: "online" }).waitFor({ timeout: UI_WAIT });
  await phone.close();
  await row("zoe-phone").locator(".status", { hasText: "offline" }).waitFor({ timeout: UI_WAIT });

  // messages to the console are listed; a message waiting for an offline device shows in its inbox count
  const receipts = await desktop.send({ device: "zoe-phone" }, "reminder", { text: "buy milk" }, { ack: true });
  assert.deepEqual(receipts.map((r) => r.status), ["queued"]);
  await desktop.send({ type: "web" }, "note", { text: "hello console" }, { ack: true, id: "to-console" });
  await page.locator('#messages li[data-id="to-console"]', { hasText: "hello console" }).waitFor({ timeout: UI_WAIT });
  await row("zoe-phone").locator(".inbox", { hasText: "1" }).waitFor({ timeout: UI_WAIT });
  assert.equal(await row("zoe-phone").locator(".dead").textContent(), "0");

  // pair a new device with the code the page shows; the request is approved in the page
  await page.click("#pair-new");
  await page.locator("#pair-shown").waitFor({ state: "visible", timeout: UI_WAIT }); // the code arrived
  const shown = (await page.locator("#pair-code").textContent({ timeout: UI_WAIT })).trim();
  assert.match(shown, /^[0-9A-Z]{4}-[0-9A-Z]{4}$/);
  assert.ok(Number(await page.locator("#pair-qr").getAttribute("data-modules")) >= 21, "no QR code drawn");
  assert.ok((await page.locator("#pair-qr").getAttribute("data-text")).includes(shown));
  const pairing = pair(server.wsUrl, shown, { type: "tablet", name: "Kitchen tablet" });
  const request = page.locator("#pair-requests li[data-request]", { hasText: "Kitchen tablet" });
  await request.waitFor({ timeout: UI_WAIT });
  await request.locator(".approve").click();
  const tablet = await pairing;
  server.track(tablet.client);
  await row(tablet.deviceId).locator(".status", { hasText: "online" }).waitFor({ timeout: UI_WAIT });
  assert.equal(await row(tablet.deviceId).locator(".name").textContent(), "Kitchen tablet");
  await request.waitFor({ state: "detached", timeout: UI_WAIT }); // decided: no longer listed

  if (SCREENSHOT) await page.screenshot({ path: join(REPO, SCREENSHOT), fullPage: true });

  // rename the tablet from the page: the server has the new name
  await row(tablet.deviceId).locator(".rename").click();
  await row(tablet.deviceId).locator(".rename-input").fill("Fridge tablet");
  await row(tablet.deviceId).locator(".rename-save").click();
  await row(tablet.deviceId).locator(".name", { hasText: "Fridge tablet" }).waitFor({ timeout: UI_WAIT });
  const named = (await desktop.devices()).find((device) => device.id === tablet.deviceId);
  assert.equal(named.name, "Fridge tablet");

  // revoke it (two clicks): gone from the page, its connection closed for good with 4410
  await row(tablet.deviceId).locator(".revoke").click();
  await row(tablet.deviceId).locator(".revoke", { hasText: "Really revoke?" }).click();
  await row(tablet.deviceId).waitFor({ state: "detached", timeout: UI_WAIT });
  assert.equal((await tablet.client.closed).code, 4410);
  assert.ok(!(await desktop.devices()).some((device) => device.id === tablet.deviceId));

  // opened again, the console connects with its stored credential as the same device
  await page.reload();
  await page.locator("#connection.up").waitFor({ timeout: UI_WAIT });
  await row(consoleId).waitFor({ timeout: UI_WAIT });
  assert.equal(await page.locator("#devices tr[data-device]").count(), 3); // console, desktop, phone

  // the console revoked from another device forgets its credential
  await desktop.revokeDevice(consoleId);
  await page.locator("#notice", { hasText: "revoked" }).waitFor({ timeout: UI_WAIT });
  assert.equal(await page.evaluate(() => localStorage.getItem("rccs-console")), null);

  assert.deepEqual(outside, [], "the page requested something outside this machine");
  assert.deepEqual(pageErrors, []);
  await context.close();
});

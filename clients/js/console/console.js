// The rccs web console: a device of type "web" that shows and manages the user's devices. Built on the JS
// client (../src); bundled by build.mjs into rccs/console/console.js, served by rccs at /console/.
import qrcode from "qrcode-generator";

import { Client, ConnectionClosed, pair } from "../src/index.js";

const STORE_KEY = "rccs-console"; // localStorage: {credential, deviceId, user}
const MAX_MESSAGES = 20;
const COUNTS_EVERY = 5000; // ms between refreshes of the inbox and dead-letter counts

const $ = (selector) => document.querySelector(selector);

function element(tag, properties = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(properties)) {
    if (key === "className") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

function notice(text) {
  const box = $("#notice");
  box.textContent = text;
  box.hidden = !text;
}

function setConnection(text, up) {
  const box = $("#connection");
  box.textContent = text;
  box.className = `connection ${up ? "up" : "down"}`;
}

const when = (ms) => (ms ? new Date(ms).toLocaleString() : "–");

/** Where the WebSocket endpoint is: the server's public_url, else this host on the server's WebSocket port. */
async function endpoint() {
  const response = await fetch("config.json", { cache: "no-cache" });
  const config = await response.json();
  if (config.ws_url) return config.ws_url;
  return `${config.tls ? "wss" : "ws"}://${location.hostname}:${config.ws_port}${config.ws_path}`;
}

function saved() {
  try {
    return JSON.parse(localStorage.getItem(STORE_KEY) ?? "null");
  } catch {
    return null;
  }
}

async function pairThisBrowser(url, code) {
  notice("Pairing this browser…");
  const paired = await pair(url, code, { type: "web", name: "Web console", platform: "browser" }, {
    onPending: () => notice("Waiting for one of your devices to approve this browser…"),
  });
  localStorage.setItem(STORE_KEY, JSON.stringify({ credential: paired.credential, deviceId: paired.deviceId,
    user: paired.user }));
  notice("");
  return paired.client;
}

function showJoin(url) {
  $("#join").hidden = false;
  setConnection("not paired", false);
  $("#join-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const client = await pairThisBrowser(url, $("#join-code").value);
      $("#join").hidden = true;
      run(client);
    } catch (error) {
      notice(`Pairing failed: ${error.code ?? error.message}`);
    }
  });
}

class Console {
  constructor(client) {
    this.client = client;
    this.devices = new Map(); // id -> device as `devices` reports it, kept current by presence events
    this.rows = new Map(); // id -> <tr>
    this.requests = new Map(); // pairing request id -> <li>
    this.refreshing = null;
  }

  start() {
    const client = this.client;
    $("#who").textContent = `user ${client.user} · this console is device ${client.deviceId}`;
    setConnection("connected", true);
    for (const id of ["#devices-section", "#pairing-section", "#messages-section"]) $(id).hidden = false;
    client.on("presence", (event) => this.onPresence(event));
    client.on("pair.joined", () => this.refresh());
    client.on("pair.request", (event) => this.addRequest(event));
    client.on("pair.withdrawn", (event) => this.removeRequest(event.request));
    client.on("disconnect", () => setConnection("reconnecting…", false));
    client.on("reconnect", () => {
      setConnection("connected", true);
      this.refresh();
    });
    client.on("close", (closed) => this.onClose(closed));
    $("#pair-new").addEventListener("click", () => this.showCode());
    this.refresh();
    this.timer = setInterval(() => this.refresh(), COUNTS_EVERY);
    this.readMessages();
  }

  onClose(closed) {
    clearInterval(this.timer);
    setConnection("disconnected", false);
    if (closed.code === 4410) {
      localStorage.removeItem(STORE_KEY);
      notice("This console was revoked. Open it with a new pairing code to use it again.");
    } else if (closed.code === 4409) {
      notice("This console was opened in another tab or window; that one is in charge now.");
    } else {
      notice(`Disconnected (${closed.code}).`);
    }
  }

  /** The devices with their counts, from the server; the table follows. Runs one at a time. */
  async refresh() {
    if (this.refreshing) return this.refreshing;
    this.refreshing = (async () => {
      try {
        const devices = await this.client.devices({ counts: true });
        this.devices = new Map(devices.map((device) => [device.id, device]));
        this.render();
      } catch (error) {
        if (!(error instanceof ConnectionClosed)) console.warn("rccs console: listing devices failed", error);
      } finally {
        this.refreshing = null;
      }
    })();
    return this.refreshing;
  }

  onPresence(event) {
    const device = this.devices.get(event.device);
    if (event.status === "revoked") {
      this.devices.delete(event.device);
      this.render();
      return;
    }
    if (!device) {
      this.refresh(); // a device this table does not know yet
      return;
    }
    device.status = event.status;
    device.last_seen = event.last_seen;
    this.render();
  }

  render() {
    const body = $("#devices tbody");
    for (const [id, row] of this.rows) {
      if (!this.devices.has(id)) {
        row.remove();
        this.rows.delete(id);
      }
    }
    for (const device of this.devices.values()) {
      let row = this.rows.get(device.id);
      if (!row) {
        row = this.makeRow(device.id);
        this.rows.set(device.id, row);
      }
      body.append(row); // in the server's order (oldest first)
      row.classList.toggle("me", device.id === this.client.deviceId);
      const cell = (name) => row.querySelector(`.${name}`);
      if (!row.classList.contains("editing")) cell("name").textContent = device.name || "–";
      cell("type").textContent = device.type;
      cell("status").textContent = device.status;
      cell("status").className = `status ${device.status}`;
      cell("caps").textContent = (device.capabilities ?? []).join(", ") || "–";
      cell("last-seen").textContent = when(device.last_seen);
      cell("inbox").textContent = String(device.inbox ?? "–");
      cell("dead").textContent = String(device.dead_letters ?? "–");
    }
  }

  makeRow(id) {
    const rename = element("button", { type: "button", className: "rename", textContent: "Rename" });
    const revoke = element("button", { type: "button", className: "revoke danger", textContent: "Revoke" });
    const row = element("tr", { "data-device": id },
      element("td", { className: "id" }, id), element("td", { className: "name" }), element("td", { className: "type" }),
      element("td", { className: "status" }), element("td", { className: "caps" }),
      element("td", { className: "last-seen" }), element("td", { className: "inbox number" }),
      element("td", { className: "dead number" }), element("td", { className: "actions" }, rename, revoke));
    rename.addEventListener("click", () => this.startRename(row, id));
    revoke.addEventListener("click", async () => {
      if (!revoke.classList.contains("confirm")) { // a second click confirms
        revoke.classList.add("confirm");
        revoke.textContent = "Really revoke?";
        return;
      }
      revoke.disabled = true;
      try {
        await this.client.revokeDevice(id);
        this.devices.delete(id);
        this.render();
      } catch (error) {
        notice(`Revoking ${id} failed: ${error.code ?? error.message}`);
        revoke.disabled = false;
      }
    });
    return row;
  }

  startRename(row, id) {
    if (row.classList.contains("editing")) return;
    row.classList.add("editing");
    const cell = row.querySelector(".name");
    const input = element("input", { className: "rename-input", value: this.devices.get(id)?.name ?? "" });
    const save = element("button", { type: "button", className: "rename-save", textContent: "Save" });
    const form = element("form", {}, input, save);
    cell.replaceChildren(form);
    input.focus();
    const done = async () => {
      try {
        const device = await this.client.updateDevice({ name: input.value }, { device: id });
        this.devices.set(id, { ...this.devices.get(id), ...device });
      } catch (error) {
        notice(`Renaming ${id} failed: ${error.code ?? error.message}`);
      }
      row.classList.remove("editing");
      this.render();
    };
    save.addEventListener("click", done);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      done();
    });
  }

  async showCode() {
    try {
      const code = await this.client.createPairingCode({ approve: true });
      $("#pair-code").textContent = code.code;
      $("#pair-expires").textContent = when(code.expires_at);
      drawQr($("#pair-qr"), code.uri);
      $("#pair-shown").hidden = false;
    } catch (error) {
      notice(`No pairing code: ${error.code ?? error.message}`);
    }
  }

  addRequest(event) {
    const list = $("#pair-requests");
    list.querySelector(".empty")?.remove();
    const device = event.device ?? {};
    const approve = element("button", { type: "button", className: "approve", textContent: "Approve" });
    const deny = element("button", { type: "button", className: "deny danger", textContent: "Deny" });
    const item = element("li", { "data-request": event.request },
      `${device.name || "a device"} (${device.type ?? "?"}${device.platform ? `, ${device.platform}` : ""}) from ${event.address} `,
      approve, " ", deny);
    const decide = async (yes) => {
      approve.disabled = deny.disabled = true;
      try {
        if (yes) await this.client.approvePairing(event.request);
        else await this.client.denyPairing(event.request);
      } catch (error) {
        notice(`The request is no longer open (${error.code ?? error.message}).`);
      }
      this.removeRequest(event.request);
    };
    approve.addEventListener("click", () => decide(true));
    deny.addEventListener("click", () => decide(false));
    this.requests.set(event.request, item);
    list.append(item);
  }

  removeRequest(request) {
    this.requests.get(request)?.remove();
    this.requests.delete(request);
    const list = $("#pair-requests");
    if (!list.children.length) list.append(element("li", { className: "empty" }, "none"));
  }

  async readMessages() {
    const list = $("#messages");
    for await (const message of this.client.messages()) {
      list.querySelector(".empty")?.remove();
      const body = JSON.stringify(message.body);
      list.prepend(element("li", { "data-id": String(message.id) }, `${when(message.ts)} from ${message.from}: `,
        element("strong", { className: "type" }, message.type), " ",
        element("code", { className: "body" }, body.length > 200 ? `${body.slice(0, 200)}…` : body)));
      while (list.children.length > MAX_MESSAGES) list.lastElementChild.remove();
    }
  }
}

/** The QR code of `text`, drawn on `canvas` (qrcode-generator computes the modules). */
function drawQr(canvas, text) {
  const qr = qrcode(0, "M");
  qr.addData(text);
  qr.make();
  const modules = qr.getModuleCount();
  const quiet = 4; // the quiet zone around the code, in modules
  const scale = Math.max(2, Math.floor(canvas.width / (modules + 2 * quiet)));
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.fillStyle = "#000";
  const offset = Math.floor((canvas.width - modules * scale) / 2);
  for (let row = 0; row < modules; row += 1) {
    for (let column = 0; column < modules; column += 1) {
      if (qr.isDark(row, column)) context.fillRect(offset + column * scale, offset + row * scale, scale, scale);
    }
  }
  canvas.dataset.modules = String(modules);
  canvas.dataset.text = text;
}

function run(client) {
  const view = new Console(client);
  window.rccsConsole = view; // for a look from the browser's developer tools
  view.start();
}

async function main() {
  const url = await endpoint();
  const code = new URLSearchParams(location.hash.slice(1)).get("code");
  if (code) {
    history.replaceState(null, "", location.pathname + location.search); // a used code stays out of the address bar
    try {
      run(await pairThisBrowser(url, code));
      return;
    } catch (error) {
      notice(`Pairing with code ${code} failed: ${error.code ?? error.message}`);
    }
  }
  const stored = saved();
  if (!stored) {
    showJoin(url);
    return;
  }
  const client = new Client(url, { credential: stored.credential });
  try {
    await client.connect();
  } catch (error) {
    if (error instanceof ConnectionClosed && (error.code === 4401 || error.code === 4410)) {
      localStorage.removeItem(STORE_KEY); // revoked or unknown: this browser must pair again
      showJoin(url);
      notice("This browser's credential no longer works; pair it again.");
      return;
    }
    notice(`Cannot connect: ${error.message}`);
    return;
  }
  run(client);
}

main();

// A real rccs server for a test: tests/js_server.py (the repo's server, in-process, on free ports) as a child
// process, driven by JSON lines over its stdin. RCCS_PYTHON names the Python to run it with (default: the
// repo's .venv, else python3).

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import { Client } from "../src/node.js";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const VENV_PYTHON = join(REPO, ".venv/bin/python");
export const PYTHON = process.env.RCCS_PYTHON ?? (existsSync(VENV_PYTHON) ? VENV_PYTHON : "python3");
export const WAIT = 5000; // ms any single expected event may take before a test fails

export async function startServer(settings = {}) {
  const args = [join(REPO, "tests/js_server.py")];
  for (const [name, value] of Object.entries(settings)) args.push(`--${name}`, String(value));
  const child = spawn(PYTHON, args, {
    cwd: REPO,
    env: { ...process.env, PYTHONPATH: REPO + (process.env.PYTHONPATH ? `:${process.env.PYTHONPATH}` : "") },
    stdio: ["pipe", "pipe", "inherit"],
  });
  const lines = createInterface({ input: child.stdout });
  const pending = new Map();
  let nextId = 0;
  const started = new Promise((resolveStart, rejectStart) => {
    child.once("exit", (code) => rejectStart(new Error(`the test server exited (${code}) before it listened`)));
    lines.once("line", (line) => resolveStart(JSON.parse(line)));
  });
  const { ws_url: wsUrl, http_url: httpUrl } = await started;
  lines.on("line", (line) => {
    const reply = JSON.parse(line);
    const waiter = pending.get(reply.id);
    if (!waiter) return;
    pending.delete(reply.id);
    if ("error" in reply) waiter.reject(new Error(reply.error));
    else waiter.resolve(reply.result);
  });
  const exited = new Promise((resolveExit) => child.once("exit", resolveExit));
  const clients = [];

  const command = (cmd, fields = {}) => new Promise((resolveCommand, rejectCommand) => {
    nextId += 1;
    pending.set(nextId, { resolve: resolveCommand, reject: rejectCommand });
    child.stdin.write(JSON.stringify({ id: nextId, cmd, ...fields }) + "\n");
  });

  return {
    wsUrl,
    httpUrl,
    command,
    token: (user, device) => command("token", { user, device }),
    code: (user, { approve = false } = {}) => command("code", { user, approve }),
    drop: (user, device) => command("drop", { user, device }),
    pending: (user, device) => command("pending", { user, device }),
    retry: (pastMs) => command("retry", { past_ms: pastMs }),
    /** A connected client of device `device` of `user` (closed by stop()). */
    async connect(user, device, options = {}) {
      const { type = "desktop", ...rest } = options;
      const client = new Client(wsUrl, { token: await command("token", { user, device }), device: { type }, ...rest });
      clients.push(client);
      await client.connect();
      return client;
    },
    track(client) {
      clients.push(client);
      return client;
    },
    async stop() {
      await Promise.all(clients.map((client) => client.close().catch(() => {})));
      child.stdin.end();
      const timer = setTimeout(() => child.kill("SIGKILL"), 10000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** Ping round trips on each client, in order: what the server wrote or read before them has happened. */
export async function barrier(...clients) {
  for (const client of clients) await client.ping();
}

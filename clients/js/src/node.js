// rccs-client in Node: the global WebSocket when there is one (Node >= 22), else the `ws` package.
import WebSocket from "ws";

import { setWebSocket } from "./client.js";

if (typeof globalThis.WebSocket !== "function") setWebSocket(WebSocket);

export * from "./index.js";

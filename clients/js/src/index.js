// rccs-client: the browser (and any runtime with a global WebSocket) entry point.
export { Client, StateSubscription, TaskKeeper, pair, setWebSocket, NotConnected, FATAL_CLOSE_CODES } from "./client.js";
export {
  RccsError, StateConflict, TaskConflict, StaleEpoch, HandoffBusy, HandoffFailed, HandoffRefusal, ConnectionClosed, ReceiptTimeout, RequestTimeout,
} from "./errors.js";
export { TimeoutError } from "./queue.js";
export { mergePatch } from "./mergepatch.js";

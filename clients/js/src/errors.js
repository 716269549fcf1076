// Errors of the rccs client. The server's `error` envelopes become RccsError (or a subclass for the codes
// that carry fields: conflict, stale_epoch, handoff_busy), with the server's `code` (protocol.md 5.3).

/** The server answered with an `error` envelope; `details` holds its other fields. */
export class RccsError extends Error {
  constructor(code, message, details = {}) {
    super(`${code}: ${message}`);
    this.name = "RccsError";
    this.code = code;
    this.serverMessage = message;
    this.details = { ...details };
  }
}

/** `statePatch` with `ifRev` found the document at another revision: `rev` and `value` are current. */
export class StateConflict extends RccsError {
  constructor(message, rev, value, details = {}) {
    super("conflict", message, details);
    this.name = "StateConflict";
    this.rev = rev;
    this.value = value;
  }
}

/** `taskClaim` found another device holding a live lease. */
export class TaskConflict extends RccsError {
  constructor(message, task, owner, epoch, expires, details = {}) {
    super("conflict", message, details);
    this.name = "TaskConflict";
    this.task = task;
    this.owner = owner;
    this.epoch = epoch;
    this.expires = expires;
  }
}

/** This device does not hold the task at the epoch it named: the task is at `epoch`, held by `owner` (null: released). */
export class StaleEpoch extends RccsError {
  constructor(message, task, epoch, owner, details = {}) {
    super("stale_epoch", message, details);
    this.name = "StaleEpoch";
    this.task = task;
    this.epoch = epoch;
    this.owner = owner;
  }
}

/** A handoff of the task is open (`handoff` is its id). */
export class HandoffBusy extends RccsError {
  constructor(message, task, handoff, details = {}) {
    super("handoff_busy", message, details);
    this.name = "HandoffBusy";
    this.task = task;
    this.handoff = handoff;
  }
}

/**
 * A handoff ended without moving the task (the old owner keeps it): `reason` is the server's (`refused`,
 * `rejected`, `prepare_timeout`, `accept_timeout`, `owner_disconnected`, ...), `detail` the refusing or
 * rejecting device's reason, if it gave one.
 */
export class HandoffFailed extends RccsError {
  constructor(handoff, task, reason, detail = null) {
    super("handoff_failed", `handoff ${handoff} of task ${JSON.stringify(task)} failed: ${reason}`
      + (detail ? ` (${detail})` : ""), { handoff, task, reason, detail });
    this.name = "HandoffFailed";
    this.handoff = handoff;
    this.task = task;
    this.reason = reason;
    this.detail = detail;
  }
}

/**
 * Throw it in an onHandoffPrepare callback to refuse the handoff, or in an onHandoffOffer callback to reject
 * the task; `reason` reaches the other devices as the failure's `detail`.
 */
export class HandoffRefusal extends Error {
  constructor(reason = "") {
    super(reason);
    this.name = "HandoffRefusal";
    this.reason = reason;
  }
}

/** The connection ended and will not be re-established (close(), or the server refused it for good). */
export class ConnectionClosed extends Error {
  constructor(code, reason) {
    super(`connection closed (${code}): ${reason}`);
    this.name = "ConnectionClosed";
    this.code = code;
    this.reason = reason;
  }
}

/** Not every expected receipt arrived in time; `receipts` holds those that did. */
export class ReceiptTimeout extends Error {
  constructor(receipts) {
    super(`timed out waiting for receipts (${receipts.length} received)`);
    this.name = "ReceiptTimeout";
    this.receipts = receipts;
  }
}

/** No answer to a request in time (the connection may be down). */
export class RequestTimeout extends Error {
  constructor(what) {
    super(`no answer to ${what} in time`);
    this.name = "RequestTimeout";
  }
}

/** The error object for an `error` envelope. */
export function errorFrom(envelope) {
  const code = String(envelope.code);
  const message = String(envelope.message ?? "");
  const details = {};
  for (const [key, value] of Object.entries(envelope)) {
    if (key !== "op" && key !== "code" && key !== "message" && key !== "id") details[key] = value;
  }
  const error = typedError(code, message, envelope, details);
  if (envelope.id !== undefined) error.id = envelope.id; // the id of the envelope the error is about
  return error;
}

function typedError(code, message, envelope, details) {
  if (code === "conflict" && "rev" in envelope) {
    return new StateConflict(message, Number(envelope.rev), envelope.value ?? null, details);
  }
  if (code === "conflict" && "owner" in envelope) {
    return new TaskConflict(message, String(envelope.task), String(envelope.owner), Number(envelope.epoch),
      Number(envelope.expires), details);
  }
  if (code === "stale_epoch") {
    return new StaleEpoch(message, String(envelope.task), Number(envelope.epoch ?? 0),
      envelope.owner == null ? null : String(envelope.owner), details);
  }
  if (code === "handoff_busy") {
    return new HandoffBusy(message, envelope.task == null ? null : String(envelope.task),
      envelope.handoff == null ? null : String(envelope.handoff), details);
  }
  return new RccsError(code, message, details);
}

// Types of rccs-client (the implementation is plain ESM JavaScript in this directory).
// Durations are milliseconds throughout.

export type Id = string | number;

/** A selector (protocol.md 4.2): exactly one of device, devices, all, type, capability, plus options. */
export interface Selector {
  device?: string;
  devices?: string[];
  all?: true;
  type?: string;
  capability?: string;
  pick?: "all" | "one";
  self?: boolean;
  order?: "recent" | "listed";
}

export interface DeviceInfo {
  type?: string;
  name?: string;
  platform?: string;
  version?: string;
  capabilities?: string[];
  metadata?: Record<string, unknown>;
}

export interface Welcome {
  op: "welcome";
  protocol: number;
  session: string;
  resumed: boolean;
  resume_error?: string;
  user: string;
  device: string;
  heartbeat: number;
  server_time: number;
  expires_at: number;
  next_seq: number;
  encoding: "json" | "msgpack";
  max_message_bytes: number;
  [field: string]: unknown;
}

export interface Message {
  seq: number;
  id: Id;
  from: string;
  type: string;
  body: unknown;
  ts: number;
  ack: boolean;
}

export interface Receipt {
  id: Id;
  status: "routed" | "accepted" | "queued" | "delivered" | "expired" | "duplicate" | "failed" | "retracted" | "moved"
    | string;
  device: string | null;
  reason: string | null;
  fromDevice: string | null;
}

export interface Device {
  id: string;
  type: string;
  name: string;
  platform: string;
  version: string;
  capabilities: string[];
  metadata: Record<string, unknown>;
  created: number;
  last_seen: number;
  status: "online" | "away" | "offline";
  /** With devices({counts: true}): messages waiting in the device's durable inbox. */
  inbox?: number;
  /** With devices({counts: true}): the device's dead letters. */
  dead_letters?: number;
  [field: string]: unknown;
}

export interface PresenceEvent {
  op: "presence";
  device: string;
  status: "online" | "away" | "offline" | "revoked";
  last_seen: number;
}

export interface PairingCode {
  op: "pair.code";
  code: string;
  uri: string;
  expires_at: number;
  approve: boolean;
}

export interface TaskLease {
  task: string;
  owner: string;
  epoch: number;
  expires: number;
}

export interface TaskStatus {
  task: string;
  owner: string | null;
  epoch: number;
  expires: number;
  live: boolean;
  handoff: string | null;
}

export interface StateDoc {
  doc: string;
  rev: number;
  value: unknown;
}

export interface StatePatchResult {
  doc: string;
  rev: number;
  prevRev: number;
  noop: boolean;
}

export interface StateChange {
  doc: string;
  rev: number;
  prevRev: number;
  patch: unknown;
  by: string | null;
  value: unknown;
  snapshot: boolean;
}

export interface ClientOptions {
  token?: string | null;
  credential?: string | null;
  pairingCode?: string | null;
  device?: DeviceInfo | null;
  encoding?: "msgpack" | "json";
  /** Ack messages as the application takes them (default true). */
  autoAck?: boolean;
  /** Reconnect (with resume) after a lost connection (default true). */
  reconnect?: boolean;
  backoffInitial?: number;
  backoffMax?: number;
  /** How long requests wait for their answer (default 30000). */
  requestTimeout?: number;
  /** Callback mode: each message is acked once the (async) callback returns. */
  onMessage?: ((message: Message) => unknown) | null;
  /** Pairing only: the code needs approval; the device waits. */
  onPending?: ((pending: { request: string; expires_at: number }) => void) | null;
  /** A WebSocket class (default: the global one; in Node without one, the `ws` package). */
  WebSocket?: unknown;
}

export interface SendOptions {
  ack?: boolean;
  id?: Id;
  timeout?: number;
  ttl?: number;
  priority?: number | "LOW" | "NORMAL" | "HIGH" | "URGENT" | "EMERGENCY";
  durable?: boolean;
  firstAck?: boolean;
}

export interface CallContext {
  from: string;
  method: string;
  deadline: number;
}

export interface EventMap {
  presence: PresenceEvent;
  "pair.request": { op: "pair.request"; request: string; issuer: string | null; address: string; device: DeviceInfo;
    expires_at: number };
  "pair.joined": { op: "pair.joined"; device: Device; approved_by: string | null };
  "pair.withdrawn": { op: "pair.withdrawn"; request: string; reason: "left" | "denied" | "expired" };
  "pair.pending": { op: "pair.pending"; request: string; expires_at: number };
  retract: { op: "retract"; seq: number; id: Id; from: string };
  receipt: Receipt;
  error: RccsError;
  disconnect: { code: number | null; reason: string };
  reconnect: Welcome;
  close: ConnectionClosed;
  state: StateChange;
  "task.renewed": TaskLease;
}

export class Client {
  constructor(url: string, options: ClientOptions);
  readonly url: string;
  readonly closed: Promise<ConnectionClosed>;
  readonly connected: boolean;
  welcome: Welcome | null;
  sessionId: string | null;
  deviceId: string | null;
  user: string | null;
  credential: string | null;
  token: string | null;
  autoAck: boolean;
  lastSeq: number;
  reconnects: number;
  duplicates: number;

  connect(): Promise<Welcome>;
  close(): Promise<void>;
  on<K extends keyof EventMap>(name: K, listener: (event: EventMap[K]) => void): () => void;
  nextEvent<K extends keyof EventMap>(name: K, options?: { timeout?: number; filter?: (event: EventMap[K]) => boolean }):
    Promise<EventMap[K]>;
  newId(): string;

  send(to: Selector | string, type: string, body?: unknown, options?: SendOptions): Promise<Receipt[]>;
  ack(seq: number | number[]): Promise<void>;
  nextMessage(options?: { timeout?: number | null }): Promise<Message>;
  messages(): AsyncGenerator<Message, void, undefined>;
  request(op: string, fields?: Record<string, unknown>, options?: { timeout?: number; id?: Id }):
    Promise<Record<string, any>>;
  ping(): Promise<number>;
  serverTime(): number;

  devices(options?: { counts?: boolean }): Promise<Device[]>;
  updateDevice(changes: DeviceInfo, options?: { device?: string }): Promise<Device>;
  revokeDevice(device: string): Promise<void>;
  sessions(): Promise<Record<string, any>[]>;
  revokeSession(session: string): Promise<void>;
  setPresence(status: "online" | "away"): Promise<void>;
  refresh(options: { token?: string; credential?: string }): Promise<number>;
  createPairingCode(options?: { approve?: boolean; ttl?: number }): Promise<PairingCode>;
  approvePairing(request: string): Promise<void>;
  denyPairing(request: string): Promise<void>;

  call(to: Selector | string, method: string, params?: unknown, options?: { timeout?: number; id?: Id }):
    Promise<unknown>;
  onCall(method: string, handler: ((params: any, context: CallContext) => unknown) | null): void;

  stateGet(doc: string): Promise<StateDoc>;
  statePatch(doc: string, patch: unknown, options?: { ifRev?: number; id?: Id; task?: string; epoch?: number }):
    Promise<StatePatchResult>;
  stateSubscribe(options: { doc?: string; prefix?: string; known?: Record<string, { rev: number; value: unknown }> }):
    Promise<StateSubscription>;

  taskClaim(task: string, options?: { ttl?: number }): Promise<TaskLease>;
  taskRenew(task: string, epoch: number, options?: { ttl?: number; timeout?: number }): Promise<TaskLease>;
  taskRelease(task: string, epoch: number): Promise<void>;
  taskList(task?: string | null): Promise<TaskStatus[]>;
  keepTask(lease: TaskLease, options?: { ttl?: number }): TaskKeeper;

  handoff(task: string, to: Selector | string, options?: { timeout?: number }): Promise<HandoffResult>;
  onHandoffPrepare(callback: ((prepare: HandoffPrepare) => unknown) | null): void;
  onHandoffOffer(callback: ((offer: HandoffOffer) => boolean | Promise<boolean>) | null): void;
  onTaskGained(callback: ((result: HandoffResult) => unknown) | null): void;
  onTaskLost(callback: ((result: HandoffResult) => unknown) | null): void;
  onHandoffFailed(callback: ((failure: HandoffFailed) => unknown) | null): void;
}

export interface HandoffResult {
  handoff: string;
  task: string;
  owner: string;
  epoch: number;
  /** null in a handoff.revoked */
  expires: number | null;
}

export interface HandoffPrepare {
  handoff: string;
  task: string;
  to: string;
  epoch: number;
  deadline: number;
}

export interface HandoffOffer {
  handoff: string;
  task: string;
  from: string;
  checkpoint: unknown;
  epoch: number;
  deadline: number;
}

export class TaskKeeper {
  readonly lease: TaskLease;
  readonly renewals: number;
  /** The error that ended it (StaleEpoch: handed off), or null after stop(). */
  readonly ended: Promise<RccsError | null>;
  stop(): void;
}

export class StateSubscription implements AsyncIterable<StateChange> {
  readonly doc: string | null;
  readonly prefix: string | null;
  readonly revs: Map<string, number>;
  readonly values: Map<string, unknown>;
  next(options?: { timeout?: number | null }): Promise<StateChange>;
  [Symbol.asyncIterator](): AsyncIterator<StateChange>;
  close(): Promise<void>;
}

export interface Paired {
  credential: string;
  deviceId: string;
  user: string;
  client: Client;
  welcome: Welcome;
}

export function pair(url: string, code: string, device: DeviceInfo,
  options?: Omit<ClientOptions, "token" | "credential" | "pairingCode" | "device">): Promise<Paired>;

export function setWebSocket(implementation: unknown): void;
export function mergePatch(target: unknown, patch: unknown): unknown;
export const FATAL_CLOSE_CODES: Set<number>;

export class RccsError extends Error {
  constructor(code: string, message: string, details?: Record<string, unknown>);
  readonly code: string;
  readonly serverMessage: string;
  readonly details: Record<string, unknown>;
  /** The id of the envelope the error is about, when the server named one. */
  id?: Id;
}
export class StateConflict extends RccsError {
  readonly rev: number;
  readonly value: unknown;
}
export class TaskConflict extends RccsError {
  readonly task: string;
  readonly owner: string;
  readonly epoch: number;
  readonly expires: number;
}
export class StaleEpoch extends RccsError {
  readonly task: string;
  readonly epoch: number;
  readonly owner: string | null;
}
export class HandoffBusy extends RccsError {
  readonly task: string | null;
  readonly handoff: string | null;
}
export class HandoffFailed extends RccsError {
  readonly handoff: string;
  readonly task: string;
  readonly reason: string;
  readonly detail: string | null;
}
export class HandoffRefusal extends Error {
  constructor(reason?: string);
  readonly reason: string;
}
export class ConnectionClosed extends Error {
  readonly code: number | null;
  readonly reason: string;
  /** For a refused hello: the server's error that came before the close. */
  error?: RccsError;
}
export class ReceiptTimeout extends Error {
  readonly receipts: Receipt[];
}
export class RequestTimeout extends Error {}
export class TimeoutError extends Error {}
export class NotConnected extends Error {}

// Compiled by `npm run typecheck` (tsc, never run): the README's usage type-checks against src/index.d.ts.
import { Client, ConnectionClosed, HandoffRefusal, RccsError, StaleEpoch, pair } from "rccs-client";
import type { Message, Receipt, StateChange, TaskLease, Welcome } from "rccs-client";

export async function usage(url: string, token: string, code: string): Promise<void> {
  const me = new Client(url, { token, device: { type: "web" }, encoding: "msgpack" });
  const welcome: Welcome = await me.connect();
  const session: string = welcome.session;
  const receipts: Receipt[] = await me.send({ device: "alice-phone" }, "note", { text: "hi" }, { ack: true, timeout: 5000 });
  for await (const m of me.messages()) {
    const message: Message = m;
    const from: string = message.from;
    void [from, message.id, message.type, message.body];
    break;
  }
  const { credential, deviceId } = await pair(url, code, { type: "web", name: "Browser" });
  const level = await me.call({ type: "mobile" }, "battery.level", { unit: "%" }, { timeout: 10000 });
  me.onCall("ping", (params, context) => ({ params, from: context.from }));
  const off = me.on("presence", (event) => { const status: string = event.status; void status; });
  off();
  const devices = await me.devices();
  const names: string[] = devices.map((device) => device.name);
  const draft = await me.stateGet("user/draft");
  await me.statePatch("user/draft", { text: "x" }, { ifRev: draft.rev });
  const subscription = await me.stateSubscribe({ doc: "user/draft" });
  for await (const change of subscription) {
    const value: unknown = (change as StateChange).value;
    void value;
    break;
  }
  const lease: TaskLease = await me.taskClaim("agent", { ttl: 30000 });
  try {
    await me.taskRenew("agent", lease.epoch);
  } catch (error) {
    if (error instanceof StaleEpoch) void error.owner;
    else if (error instanceof RccsError) void error.code;
    else if (error instanceof ConnectionClosed) void error.code;
  }
  const keeper = me.keepTask(lease, { ttl: 30000 });
  me.onHandoffPrepare((prepare) => ({ step: 3, for: prepare.to }));
  me.onHandoffOffer((offer) => offer.epoch > 1);
  me.onHandoffPrepare(() => { throw new HandoffRefusal("busy"); });
  const moved = await me.handoff("agent", { device: "alice-phone" });
  const ended = await keeper.ended;
  void [session, receipts, credential, deviceId, level, names, moved.epoch, ended?.code];
  await me.close();
}

"""The Redis broker: what crosses connections reaches the node that holds them, on any number of nodes.

Theory of operation. Every node has a channel of its own (``rccs:node:<id>``) and listens on the shared
control channel (``rccs:ctl``). Redis Pub/Sub is only the doorbell here: it carries receipts, notices,
revocations and feature events between live nodes, while whatever must survive a lost message lives in
the store (a receipt that finds no connection is kept there; revocations are also in the store's change
feed, which every node polls).

Where a device is connected is a directory in Redis (the hash ``rccs:where``: ``user NUL device`` ->
node id), mirrored in every node's memory and kept current by ``on``/``off`` announcements on the control
channel, so that ``to_device`` and ``to_user`` decide without a round trip. Each time a node takes a device
(it connected there) Redis gives that connection the device's next epoch (``rccs:epochs``); of two
connections of one device on two nodes, the one with the higher epoch holds it and the other is closed,
whatever order the announcements arrive in. A node announces itself in
the sorted set ``rccs:nodes`` (score: the time its heartbeat expires); a node that stops beating is dead
and its directory entries are ignored (and removed by the others). When a device connects to a node, the
node that held it before closes its older connection (``device_moved``).

Order: everything this node publishes goes out in the order it was asked for, through one connection
(a writer task pipelines what accumulated during one turn of the event loop), and Redis delivers it to
each subscriber in that order; what the attached local nodes hold gets it at once, in the caller's turn.
``flush`` sends what is queued and waits until a barrier published on this node's own channel comes back,
so everything another node published to this one before the call has been processed.

A ``first_ack`` message with copies on several nodes is decided here too (``claim_first_ack``): the key
``rccs:{user}:first-ack:<sender> NUL <id>`` names the device whose ack came first; the script that sets it
also publishes the winner on the control channel, so a node cannot win without the others being told (a
lost notice is made up for by the losers' own look-ups). It expires after the time the caller gives.

After the Pub/Sub connection breaks, the reader reconnects with backoff, subscribes again, reloads the
directory (a lost announcement costs at most that) and has the nodes look in the store for what their
devices may have missed (``BrokerNode.resubscribed``): a lost doorbell costs latency, never a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from .base import FIRST_ACK_SETTLED, Broker, BrokerUnavailable

log = logging.getLogger("rccs.broker")

CONTROL = "rccs:ctl"
NODES = "rccs:nodes"
WHERE = "rccs:where"
EPOCHS = "rccs:epochs"  # user NUL device -> how many times a node took the device (its connection's epoch)
HEARTBEAT_INTERVAL = 2.0  # seconds between a node's heartbeats
NODE_TTL = 10.0  # seconds without a heartbeat after which a node counts as dead
RECONNECT_MAX = 5.0  # seconds, the longest wait between reconnection attempts
BARRIER_RESEND = 1.0  # seconds a flush waits for its barrier before sending it again

# A node takes a device (it connected there): a new epoch for it, the directory names the node, and every node
# hears "on" with that epoch, in one step. Of two connections of one device, the one with the higher epoch
# holds it, whichever announcement arrives first.
_TAKE = """
local epoch = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', KEYS[3], cmsgpack.pack({'on', ARGV[2], ARGV[3], ARGV[4], epoch}))
return epoch
"""

# Remove a directory entry only if it still names this node (a newer connection elsewhere wins).
_FORGET_IF_MINE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
    return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# The arbiter of a first_ack message with copies on several nodes: the first claim sets the winner (kept for
# ARGV[2] ms) and, in the same step, every node hears it; a later claim, or a look (ARGV[1] empty), gets the
# winner as it is. One script, so two acks on two nodes cannot both win.
_CLAIM_FIRST_ACK = """
local winner = redis.call('GET', KEYS[1])
if winner or ARGV[1] == '' then
    return winner
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return ARGV[1]
"""


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("broker: %s stopped", task.get_name(), exc_info=task.exception())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _where_key(user: str, device: str) -> str:
    return f"{user}\x00{device}"


def _first_ack_key(user: str, sender: str, msg_id: str | int) -> str:
    # {user} as the hash tag, as for the store's per-user keys; the id's type is part of it ("7" is not 7).
    kind = "i" if isinstance(msg_id, int) else "s"
    return f"rccs:{{{user}}}:first-ack:{sender}\x00{kind}{msg_id}"


async def live_nodes(url: str) -> list[str]:
    """The nodes whose heartbeat in the Redis at ``url`` has not expired (a node that stops cleanly leaves at
    once, one that died after ``NODE_TTL``): for commands that must not run while a cluster serves."""
    client = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        alive: list[bytes] = await client.zrangebyscore(NODES, time.time(), "+inf")  # type: ignore[assignment]
    finally:
        await client.aclose()
    return sorted(_text(node) for node in alive)


class RedisBroker(Broker):
    """A node's side of the Redis broker. Event loop thread only; ``start`` before use."""

    spans_nodes = True

    def __init__(self, url: str, node_id: str | None = None):
        super().__init__()
        self.url = url
        self.node_id = node_id or f"node-{secrets.token_hex(4)}"
        self.channel = f"rccs:node:{self.node_id}"
        self._client: aioredis.Redis | None = None
        self._claim_script: AsyncScript | None = None
        # What to send, in order: ("publish", channel, data, the "dev" message or None), a device taken
        # ("take", field, node, [user, device]) or a directory entry to remove ("forget", field, node, None).
        self._outbox: list[tuple[str, str, bytes | str, list[Any] | None]] = []
        # Epochs of the devices this node holds (see _TAKE), takes waiting for theirs, and the newest epoch
        # (with its node) another node announced for a device while this node's take was on its way.
        self.epochs: dict[tuple[str, str], int] = {}
        self._taking: dict[tuple[str, str], int] = {}
        self._newer: dict[tuple[str, str], tuple[int, str]] = {}
        self._outbox_ready = asyncio.Event()
        self._queued = self._written = 0  # entries queued and entries the writer is done with, ever
        self._progress = asyncio.Event()  # set after each batch the writer is done with
        self._barriers: dict[str, asyncio.Future[None]] = {}
        self._barrier_ids = itertools.count(1)
        self.where: dict[tuple[str, str], str] = {}  # (user, device) -> the node holding it
        self.alive: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self._last_beat_ok = True
        self.stats = {"published": 0, "received": 0, "reconnects": 0, "undelivered": 0, "failed": 0}

    @property
    def available(self) -> bool:
        """Redis answered the last heartbeat and the subscription is up (a lost connection clears both)."""
        return self._last_beat_ok and self._subscribed.is_set()

    # ---- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._client = aioredis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5,
                                         health_check_interval=15)
        await self._beat()
        self._tasks = [asyncio.create_task(self._read(), name="rccs broker reader"),
                       asyncio.create_task(self._write(), name="rccs broker writer"),
                       asyncio.create_task(self._heartbeat(), name="rccs broker heartbeat")]
        for task in self._tasks:
            task.add_done_callback(_report_crash)
        await asyncio.wait_for(self._subscribed.wait(), 10)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 5)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._client.zrem(NODES, self.node_id)
                mine = [field for field, node in (await self._client.hgetall(WHERE)).items()
                        if node == self.node_id.encode()]
                if mine:
                    await self._client.hdel(WHERE, *mine)
            await self._client.aclose()

    async def flush(self) -> None:
        """Everything queued is sent, and everything published to this node before it has been processed."""
        token = f"{self.node_id}-{next(self._barrier_ids)}"
        arrived = self._barriers[token] = asyncio.get_running_loop().create_future()
        try:
            while True:
                await self._subscribed.wait()
                self._queue(self.channel, ["barrier", token])
                queued = self._queued
                # A barrier published while the subscription was breaking is lost: send it again.
                done, _ = await asyncio.wait([arrived], timeout=BARRIER_RESEND)
                if done:
                    # The barrier came back; the writer also finishes its batch (what no node heard is
                    # handed back to this one), so the caller sees that too.
                    while self._written < queued:
                        self._progress.clear()
                        await self._progress.wait()
                    return
        finally:
            self._barriers.pop(token, None)

    # ---- the directory --------------------------------------------------------------

    def device_online(self, user: str, device: str) -> None:
        key = (user, device)
        self.where[key] = self.node_id
        self.epochs.pop(key, None)
        self._taking[key] = self._taking.get(key, 0) + 1
        self._outbox.append(("take", _where_key(user, device), self.node_id, [user, device]))
        self._queued += 1
        self._outbox_ready.set()

    def _took(self, user: str, device: str, epoch: int) -> None:
        """Redis gave this node's connection of the device ``epoch``: it holds the device unless another node
        announced a newer one while the answer was on its way."""
        key = (user, device)
        self._taking[key] -= 1
        if not self._taking[key]:
            del self._taking[key]
        newer = self._newer.pop(key, None) if key not in self._taking else None
        if self.where.get(key) != self.node_id:
            return  # the connection has gone meanwhile
        if newer is not None and newer[0] > epoch:
            self.where[key] = newer[1]
            for node in self._nodes:
                node.device_moved(user, device)
        else:
            self.epochs[key] = epoch

    def device_offline(self, user: str, device: str) -> None:
        self.epochs.pop((user, device), None)
        if self.where.get((user, device)) == self.node_id:
            del self.where[(user, device)]
        self._queue_directory("forget", _where_key(user, device))
        self._queue(CONTROL, ["off", self.node_id, user, device])

    def held_elsewhere(self) -> list[tuple[str, str]]:
        return [key for key, node in self.where.items() if node != self.node_id and node in self.alive]

    def holder(self, user: str, device: str) -> str | None:
        node = self.where.get((user, device))
        if node is None or node == self.node_id or node not in self.alive:
            return None
        return node

    # ---- publishing -------------------------------------------------------------------

    def to_device(self, user: str, device: str, envelope: dict[str, Any]) -> bool:
        if any(node.deliver_to_device(user, device, envelope) for node in self._nodes):
            return True
        holder = self.holder(user, device)
        if holder is None:
            return False
        self._queue(f"rccs:node:{holder}", ["dev", user, device, envelope])
        return True

    def message_to_device(self, user: str, device: str, message: dict[str, Any]) -> bool:
        holder = self.holder(user, device)
        if holder is None:
            return False
        self._queue(f"rccs:node:{holder}", ["msg", user, device, message])
        return True

    def to_user(self, user: str, envelope: dict[str, Any], exclude: str | None = None) -> int:
        # Every node gets it (not only those the directory names): a device that connected elsewhere a moment
        # ago, before its announcement arrived here, must not miss a notice published after it connected.
        reached = sum(node.deliver_to_user(user, envelope, exclude) for node in self._nodes)
        self._queue(CONTROL, ["user", self.node_id, user, exclude, envelope])
        return reached + sum(1 for (owner, device), node in self.where.items()
                             if owner == user and device != exclude and node != self.node_id and node in self.alive)

    def revoke_device(self, device: str, at: int) -> None:
        for node in list(self._nodes):
            node.device_revoked(device, at)
        self._queue(CONTROL, ["revoke-device", self.node_id, device, at])

    def revoke_session(self, session_id: str, at: int) -> None:
        for node in list(self._nodes):
            node.session_revoked(session_id, at)
        self._queue(CONTROL, ["revoke-session", self.node_id, session_id, at])

    def publish(self, channel: str, payload: Any) -> None:
        for node in list(self._nodes):
            node.deliver_event(channel, payload)
        self._queue(CONTROL, ["event", self.node_id, channel, payload])

    async def claim_first_ack(self, user: str, sender: str, msg_id: str | int, device: str | None,
                              keep_ms: int) -> str | None:
        """In Redis (``_CLAIM_FIRST_ACK``): the other nodes hear a winning claim on the control channel, in the
        same step as it is taken, so no node can hold the claim without the others being told."""
        assert self._client is not None
        notice = msgpack.packb(["event", self.node_id, FIRST_ACK_SETTLED, [user, sender, msg_id, device]],
                               use_bin_type=True)
        if self._claim_script is None:
            self._claim_script = self._client.register_script(_CLAIM_FIRST_ACK)
        try:
            winner = await self._claim_script(keys=[_first_ack_key(user, sender, msg_id), CONTROL],
                                              args=[device or "", keep_ms, notice])
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        return None if winner is None else _text(winner)

    def to_node(self, node: str, channel: str, payload: Any) -> bool:
        if node == self.node_id or node not in self.alive:
            return False
        self._queue(f"rccs:node:{node}", ["event", self.node_id, channel, payload])
        return True

    # ---- the writer: one connection, in order -----------------------------------------

    def _queue(self, channel: str, message: list[Any]) -> None:
        # A "dev" message that no node hears (its node died, not yet noticed) is handed back: see _write.
        self._outbox.append(("publish", channel, msgpack.packb(message, use_bin_type=True),
                             message if message[0] == "dev" else None))
        self._queued += 1
        self._outbox_ready.set()

    def _queue_directory(self, change: str, field: str, node: str | None = None) -> None:
        # Directory writes travel in the same ordered stream as the announcements that follow them.
        self._outbox.append((change, field, node or self.node_id, None))
        self._queued += 1
        self._outbox_ready.set()

    async def _write(self) -> None:
        assert self._client is not None
        forget = self._client.register_script(_FORGET_IF_MINE)
        take = self._client.register_script(_TAKE)
        delay = 0.05
        while True:
            await self._outbox_ready.wait()
            batch, self._outbox = self._outbox, []
            self._outbox_ready.clear()
            while batch:
                try:
                    pipe = self._client.pipeline(transaction=False)
                    for kind, target, data, extra in batch:
                        if kind == "publish":
                            pipe.publish(target, data)
                        elif kind == "take":
                            assert extra is not None
                            await take(keys=[WHERE, EPOCHS, CONTROL], args=[target, data, *extra], client=pipe)
                        else:
                            await forget(keys=[WHERE], args=[target, data], client=pipe)
                    replies = await pipe.execute()
                    self.stats["published"] += len(batch)
                    for (kind, _, _, extra), reply in zip(batch, replies, strict=True):
                        if kind == "take":
                            assert extra is not None
                            self._took(extra[0], extra[1], int(reply))
                        elif extra is not None and reply == 0:  # a "dev" message no node listened for
                            self._unheard(extra)
                    self._written += len(batch)
                    self._progress.set()
                    batch = []
                    delay = 0.05
                except (RedisError, OSError) as exc:
                    log.warning("broker: publishing failed (%s); retrying in %.2f s", exc, delay)
                    self.stats["reconnects"] += 1
                    await asyncio.sleep(delay)  # backoff before the next attempt, in order
                    delay = min(delay * 2, RECONNECT_MAX)

    def _unheard(self, message: list[Any]) -> None:
        """A message for one device's node that no node subscribed to: what must not be lost is kept here."""
        _, user, device, envelope = message
        self.stats["undelivered"] += 1
        if not any(node.deliver_to_device(user, device, envelope) for node in self._nodes):
            for node in self._nodes:
                node.undeliverable(user, device, envelope)

    # ---- the reader -------------------------------------------------------------------

    async def _read(self) -> None:
        delay = 0.05
        subscribed_before = False
        while True:
            pubsub = aioredis.from_url(self.url, socket_connect_timeout=5).pubsub()
            try:
                await pubsub.subscribe(CONTROL, self.channel)
                await self._load_directory()
                self._subscribed.set()
                if subscribed_before:
                    # Pub/Sub is only the doorbell: what rang while it was down is found in the store.
                    for node in self._nodes:
                        node.resubscribed()
                subscribed_before = True
                delay = 0.05
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self.stats["received"] += 1
                        try:
                            self._on_message(msgpack.unpackb(message["data"], raw=False, strict_map_key=False))
                        except Exception:  # a bug in applying one message must not stop the node's reader
                            self.stats["failed"] += 1
                            log.exception("broker: applying a message from %s failed", message.get("channel"))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._subscribed.clear()
                self.stats["reconnects"] += 1
                log.warning("broker: pub/sub connection lost (%s); reconnecting in %.2f s", exc, delay)
                await asyncio.sleep(delay)  # backoff between reconnection attempts
                delay = min(delay * 2, RECONNECT_MAX)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _load_directory(self) -> None:
        assert self._client is not None
        await self._beat()  # which nodes are alive, as of now
        entries = await self._client.hgetall(WHERE)
        where: dict[tuple[str, str], str] = {}
        for field, node in entries.items():
            user, _, device = _text(field).partition("\x00")
            where[(user, device)] = _text(node)
        # Ours are known best here: what this node holds right now.
        for key, node in self.where.items():
            if node == self.node_id:
                where[key] = node
        self.where = where

    def _on_message(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "barrier":
            waiter = self._barriers.get(message[1])
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        if kind == "msg":
            _, user, device, fields = message
            if not any(node.deliver_message(user, device, fields) for node in self._nodes):
                self.stats["undelivered"] += 1  # a live message for a device that left: not kept, as on one node
            return
        if kind == "dev":
            _, user, device, envelope = message
            if not any(node.deliver_to_device(user, device, envelope) for node in self._nodes):
                self.stats["undelivered"] += 1
                for node in self._nodes:  # it left meanwhile: what must not be lost is kept there
                    node.undeliverable(user, device, envelope)
            return
        origin = message[1]
        if origin == self.node_id:
            return  # applied locally when published
        if kind == "on":
            _, _, user, device, epoch = message
            key = (user, device)
            self.alive.add(origin)
            if key in self._taking:  # this node's own take has no epoch yet: _took decides
                if epoch > self._newer.get(key, (0, ""))[0]:
                    self._newer[key] = (epoch, origin)
                return
            if self.epochs.get(key, 0) > epoch:
                return  # this node's connection is the newer one; the other node closes its own
            self.epochs.pop(key, None)
            self.where[key] = origin
            for node in self._nodes:
                node.device_moved(user, device)
        elif kind == "off":
            _, _, user, device = message
            if self.where.get((user, device)) == origin:
                del self.where[(user, device)]
        elif kind == "user":
            _, _, user, exclude, envelope = message
            for node in self._nodes:
                node.deliver_to_user(user, envelope, exclude)
        elif kind == "revoke-device":
            for node in list(self._nodes):
                node.device_revoked(message[2], message[3])
        elif kind == "revoke-session":
            for node in list(self._nodes):
                node.session_revoked(message[2], message[3])
        elif kind == "event":
            for node in list(self._nodes):
                node.deliver_event(message[2], message[3])

    # ---- liveness -----------------------------------------------------------------------

    async def _beat(self) -> None:
        assert self._client is not None
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        pipe.zadd(NODES, {self.node_id: now + NODE_TTL})
        pipe.zrangebyscore(NODES, now, "+inf")
        pipe.zremrangebyscore(NODES, "-inf", now - NODE_TTL)
        _, alive, _ = await pipe.execute()
        self.alive = {_text(node) for node in alive}
        dead = {key: node for key, node in self.where.items() if node != self.node_id and node not in self.alive}
        if dead and self.node_id == min(self.alive, default=self.node_id):
            # One survivor speaks for a node that stopped beating: its devices are offline, its entries go.
            for field, node in (await self._client.hgetall(WHERE)).items():
                user, _, device = _text(field).partition("\x00")
                if _text(node) not in self.alive:
                    dead[(user, device)] = _text(node)
            for (user, device), node in sorted(dead.items()):
                for local in self._nodes:
                    local.device_gone(user, device)
                self._queue_directory("forget", _where_key(user, device), node)
        for key in dead:
            self.where.pop(key, None)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)  # the beat's period, not synchronisation
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                if self._last_beat_ok:
                    log.warning("broker: heartbeat failed (%s)", exc)
                self._last_beat_ok = False
            else:
                if not self._last_beat_ok:
                    log.warning("broker: Redis answers again")
                self._last_beat_ok = True

"""Who is where: the registry of users and devices, the routing table of open connections, presence.

Theory of operation. The routing table (compiled, ``rccs._fastpath``) indexes this node's open sessions
by user and device, type and capability; the registry holds every user and device in memory (loaded
from the store at start, kept current by the hub's change feed). ``resolve`` turns a send's selector into
receivers, once, for every path that needs it (send, pick-one fail-over, first-ack, calls, handoffs).

What one device does that the user's other devices must hear (presence, pairing notices) goes out
through ``notify_user``, which hands it to the broker; the broker brings it back to each node, where
``write_to_user`` writes it to the local connections, encoded once per encoding.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from ._fastpath import RouteStats, RoutingTable
from ._fastpath import routing as fast_routing
from .errors import ErrorCode, ProtocolError, ReceiptReason
from .protocol import Selector, parse_selector
from .registry import Registry
from .store import STATUS_OFFLINE, DeviceRecord, StoreError, UserRecord

if TYPE_CHECKING:
    from collections.abc import Collection

    from .broker import Broker
    from .contracts import Core, LiveSession

STATUS_REVOKED = "revoked"  # presence value announced once when a device is revoked
DEVICE_CHANGED = "device.changed"  # broker channel: a device's record changed in the store (its id)

SELECT_KIND = {
    "all": fast_routing.SELECT_ALL,
    "type": fast_routing.SELECT_TYPE,
    "capability": fast_routing.SELECT_CAPABILITY,
}

Failures = list[tuple[str | None, ReceiptReason]]


def selector_matches(device: DeviceRecord, selector: Selector) -> bool:
    """Whether a registered device is one that a type/capability/all selector names."""
    if selector.kind == "type":
        return bool(device.type == selector.value)
    if selector.kind == "capability":
        return selector.value in device.capabilities
    return True  # all


class Router:
    """The registry, the routing table and presence of one node. Event loop thread only."""

    def __init__(self, core: Core, broker: Broker):
        self.core = core
        self.broker = broker
        self.registry = Registry()
        self.routing = RoutingTable()
        self.stats = RouteStats()
        self.presence: dict[str, str] = {}  # device id -> online/away (absent: offline)
        self.presence_writes: dict[str, tuple[str, int]] = {}  # device -> (status, when): for the next flush
        # Registry changes of this loop turn, written together (a connect storm registers thousands of
        # devices a second: one store transaction each was the largest cost of a first hello).
        self._users_to_add: list[UserRecord] = []
        self._devices_to_write: dict[str, None] = {}
        self._registry_write_scheduled = False
        # Several nodes: what the next registry write answers (None: written; else the StoreError), by device id,
        # so that a hello waits for its device to be in the shared store before its welcome (``registry_written``).
        self._next_registry_write: asyncio.Future[StoreError | None] | None = None
        self._registry_writes: dict[str, asyncio.Future[StoreError | None]] = {}
        self._unwritten: set[str] = set()  # devices whose last write found the store unreachable
        # One write at a time: a store that answers a batch call by call (Redis) would otherwise interleave two
        # batches, and a device could reach it before its user, still waiting in the earlier batch.
        self._registry_write_lock = asyncio.Lock()

    # ---- lookups -------------------------------------------------------------

    def online(self, user: str, device: str) -> LiveSession | None:
        return cast("LiveSession | None", self.routing.get(user, device))

    def owner_of(self, device: str) -> str | None:
        return self.registry.owner_of(device)

    def status_of(self, device: str) -> str:
        return self.presence.get(device, STATUS_OFFLINE)

    def device_info(self, device: DeviceRecord) -> dict[str, Any]:
        """A device as other devices of its user see it (``devices``, ``pair.joined``)."""
        return {
            "id": device.id,
            "type": device.type,
            "name": device.name,
            "platform": device.platform,
            "version": device.version,
            "capabilities": list(device.capabilities),
            "metadata": device.metadata,
            "created": device.created,
            "last_seen": device.last_seen,
            "status": self.status_of(device.id),
        }

    # ---- the routing table ------------------------------------------------------

    def add(self, session: LiveSession) -> LiveSession | None:
        """Make ``session`` the online connection of its device; returns the one it replaces."""
        assert session.user is not None and session.device is not None
        record = self.registry.devices[session.device]
        return cast("LiveSession | None", self.routing.add(
            session.user, session.device, record.type, record.capabilities, session))

    def remove(self, session: LiveSession) -> None:
        if session.user is not None and session.device is not None:
            self.routing.remove(session.user, session.device, session)

    def reindex(self, device: DeviceRecord) -> None:
        """The device's type or capabilities changed: the routing indexes follow at once."""
        session = self.routing.get(device.user, device.id)
        if session is not None:
            self.routing.add(device.user, device.id, device.type, device.capabilities, session)

    # ---- the registry -------------------------------------------------------------

    def register_device(self, user: str, device_id: str, now: int) -> DeviceRecord:
        """A device first seen with a dev token: registered (with its user) as the token says."""
        if user not in self.registry.users:
            self.registry.users.add(user)
            self._users_to_add.append(UserRecord(id=user, created=now))
        record = DeviceRecord(id=device_id, user=user, type="", created=now, last_seen=now)
        self.registry.put(record)
        self._devices_to_write[device_id] = None
        self._schedule_registry_write(device_id)
        self.core.bus.emit("device.registered", user=user, device=device_id, via="token")
        return record

    def update_device(self, device: DeviceRecord, fields: dict[str, Any]) -> bool:
        """Apply validated device fields; the store and the routing indexes follow. True if anything changed."""
        changed = {name: value for name, value in fields.items() if getattr(device, name) != value}
        if not changed:
            return False
        for name, value in changed.items():
            setattr(device, name, value)
        if "type" in changed or "capabilities" in changed:
            self.reindex(device)
        self._devices_to_write[device.id] = None
        self._schedule_registry_write(device.id)
        return True

    def _schedule_registry_write(self, device_id: str) -> None:
        if self.broker.spans_nodes:
            if self._next_registry_write is None:
                self._next_registry_write = asyncio.get_running_loop().create_future()
            self._registry_writes[device_id] = self._next_registry_write
        if not self._registry_write_scheduled:
            self._registry_write_scheduled = True
            self.core.spawn(self._write_registry())

    def registry_written(self, device_id: str) -> asyncio.Future[StoreError | None] | None:
        """Several nodes: the device's record waits to be written to the shared store (it registered or changed
        just now, or its last write found the store unreachable: written again now): what that write will
        answer (None: written, else the StoreError). None if nothing waits."""
        if device_id in self._unwritten:
            self._unwritten.discard(device_id)
            self._devices_to_write[device_id] = None
            self._schedule_registry_write(device_id)
        return self._registry_writes.get(device_id)

    async def _write_registry(self) -> None:
        """The users and devices registered or changed since the last write, in one store call (users
        first: a device needs its user). Runs one loop turn after the first change, as a task per change did."""
        async with self._registry_write_lock:
            # Taken once the previous write is done: what came while it ran is written together (hellos wait).
            self._registry_write_scheduled = False
            users, self._users_to_add = self._users_to_add, []
            device_ids, self._devices_to_write = list(self._devices_to_write), {}
            written, self._next_registry_write = self._next_registry_write, None
            outcome: StoreError | None = None
            if not users and not device_ids:  # an earlier write took them
                if written is not None and not written.done():
                    written.set_result(None)
                return
            try:
                await self.core.store.register(users, [self.registry.snapshot(device_id)
                                                       for device_id in device_ids])
            except StoreError as exc:
                if type(exc) is StoreError:  # unreachable, not a refusal: written again at the device's next hello
                    outcome = exc
                    self._users_to_add[:0] = users
                    if self.broker.spans_nodes:
                        self._unwritten.update(device_ids)
                raise
            finally:
                # Also after a refusal: the store kept the other devices (a refused one reads back as before).
                if self.broker.spans_nodes:
                    for device_id in device_ids:  # other nodes read them again from the shared store
                        self.broker.publish(DEVICE_CHANGED, device_id)
                        if self._registry_writes.get(device_id) is written:
                            del self._registry_writes[device_id]
                if written is not None and not written.done():
                    written.set_result(outcome)

    async def look_up_devices(self, device_ids: Collection[str]) -> None:
        """Several nodes: devices this node has not heard of (registered on another node a moment ago, before
        its notice arrived here) are read from the shared store, which has every device whose hello was
        answered. Raises StoreError."""
        records = await asyncio.gather(*(self.core.store.get_device(device_id) for device_id in device_ids))
        for record in records:
            if record is not None and record.revoked_at is None and self.registry.get(record.id) is None:
                self.adopt(record)

    def adopt(self, record: DeviceRecord) -> None:
        """A device record read from the store joins this node's registry (with its user) and routing indexes."""
        self.registry.put(record)
        self.registry.users.add(record.user)
        self.reindex(record)

    def unknown_devices(self, to: Any) -> list[str]:
        """Of the device ids a send's ``to`` names (a ``device``/``devices`` selector), those this node's
        registry does not know; [] for other selectors and malformed ones (``send`` answers those)."""
        try:
            selector = parse_selector(to)
        except ProtocolError:
            return []
        if selector.kind not in ("device", "devices"):
            return []
        names = [selector.value] if selector.kind == "device" else selector.value
        return [name for name in dict.fromkeys(names) if self.registry.get(name) is None]

    # ---- resolving selectors ---------------------------------------------------------

    def check_owned(self, user: str, names: list[str]) -> None:
        """A selector may name only the user's own devices (or unknown ones): else ``forbidden``."""
        for name in names:
            owner = self.registry.owner_of(name)
            if owner is not None and owner != user:
                raise ProtocolError(ErrorCode.FORBIDDEN, f"device {name!r} belongs to another user")

    def resolve(self, user: str, sender: str | None, selector: Selector,
                ack: bool) -> tuple[list[LiveSession], Failures, list[DeviceRecord]]:
        """Online receivers of a send's selector, the devices it could not reach (with why), and -- for
        ``ack`` sends -- the user's registered devices it names that are offline (they get it in their inbox).
        ``sender`` is left out unless the selector includes itself."""
        exclude = None if selector.include_self else sender
        offline: list[DeviceRecord] = []
        if selector.kind in ("device", "devices"):
            names: list[str] = [selector.value] if selector.kind == "device" else selector.value
            self.check_owned(user, names)
            targets: list[LiveSession] = []
            online: list[str] = []
            failures: Failures = []
            for name in names:
                if name == exclude:
                    continue
                session = self.online(user, name)
                if session is not None:
                    targets.append(session)
                    online.append(name)
                    continue
                record = self.registry.get(name) if ack else None
                if record is not None and record.revoked_at is None:
                    offline.append(record)
                else:
                    failures.append((name, ReceiptReason.OFFLINE))
            if selector.pick_one:
                if len(targets) > 1:
                    targets = [cast("LiveSession", self.routing.most_recent(user, online))]
                if targets:
                    offline = []
                elif len(offline) > 1:
                    offline = [self._likeliest(user, offline)]
                if targets or offline:
                    failures = []
            if not targets and not failures and not offline:
                failures.append((None, ReceiptReason.NO_ROUTE))
            return targets, failures, offline
        found = cast("list[LiveSession]", self.routing.select(
            user, SELECT_KIND[selector.kind], selector.value, selector.pick_one, exclude))
        if ack and not (found and selector.pick_one):
            offline = [record for record in self.registry.user_devices(user)
                       if record.id != exclude and self.online(user, record.id) is None
                       and selector_matches(record, selector)]
            if selector.pick_one and len(offline) > 1:
                offline = [self._likeliest(user, offline)]
        if not found and not offline:
            return found, [(None, ReceiptReason.NO_ROUTE)], offline
        return found, [], offline

    def _likeliest(self, user: str, offline: list[DeviceRecord]) -> DeviceRecord:
        """Of devices not connected here, the one a pick-one message waits for: one connected to another
        node (several nodes), else the most recently seen."""
        return max(offline, key=lambda record: (self.broker.holder(user, record.id) is not None, record.last_seen))

    def resolve_one(self, user: str, selector: Selector, exclude: str | None) -> LiveSession | None:
        """The most recently active online device of ``user`` that ``selector`` matches, other than
        ``exclude``; None if there is none. A selector naming another user's device is ``forbidden``."""
        if selector.kind in ("device", "devices"):
            names: list[str] = [selector.value] if selector.kind == "device" else selector.value
            self.check_owned(user, names)
            return cast("LiveSession | None",
                        self.routing.most_recent(user, [name for name in names if name != exclude]))
        found = self.routing.select(user, SELECT_KIND[selector.kind], selector.value, True, exclude)
        return cast("LiveSession", found[0]) if found else None

    def resolve_elsewhere(self, user: str, selector: Selector, exclude: str | None) -> str | None:
        """A device of ``user`` that ``selector`` matches, other than ``exclude``, connected to another node
        (several nodes only; the selector's order for ``device``/``devices``), or None."""
        if not self.broker.spans_nodes:
            return None
        if selector.kind in ("device", "devices"):
            names = self.online_matching(user, selector)
        else:
            names = [record.id for record in self.registry.user_devices(user) if selector_matches(record, selector)]
        for name in names:
            if name != exclude and self.broker.holder(user, name) is not None:
                return name
        return None

    def next_pick(self, user: str, selector: Selector, order: str, tried: Collection[str | None],
                  exclude: str | None) -> str | None:
        """Several nodes: where a pick-one message moves next: a matching device not in ``tried``, online here
        (the most recently active; with ``order`` "listed" the first listed) or else connected to another
        node; None when there is none."""
        names: list[str]
        if selector.kind in ("device", "devices"):
            names = [selector.value] if selector.kind == "device" else list(selector.value)
        else:
            names = [record.id for record in self.registry.user_devices(user) if selector_matches(record, selector)]
        here: list[str] = []
        elsewhere: list[str] = []
        for name in names:
            record = self.registry.get(name)
            if name in tried or name == exclude or record is None or record.revoked_at is not None:
                continue
            if self.online(user, name) is not None:
                here.append(name)
            elif self.broker.holder(user, name) is not None:
                elsewhere.append(name)
            else:
                continue
            if order == "listed":
                return name
        if here:
            return cast("LiveSession", self.routing.most_recent(user, here)).device or None
        return elsewhere[0] if elsewhere else None

    def online_matching(self, user: str, selector: Selector) -> list[str]:
        """The devices a selector names (in its order for ``device``/``devices``) or matches online now."""
        if selector.kind in ("device", "devices"):
            return [selector.value] if selector.kind == "device" else list(selector.value)
        return [cast("LiveSession", target).device or "" for target in self.routing.select(
            user, SELECT_KIND[selector.kind], selector.value, False, None)]

    # ---- telling a user's devices -------------------------------------------------------

    def notify_user(self, user: str, envelope: dict[str, Any], exclude: str | None = None) -> None:
        """Every open connection of ``user`` (on any node) but ``exclude``'s gets ``envelope``."""
        self.broker.to_user(user, envelope, exclude)

    def send_to_device(self, user: str, device: str, envelope: dict[str, Any]) -> bool:
        """``device``'s open connection (on any node) gets ``envelope``; False if it has none."""
        return self.broker.to_device(user, device, envelope)

    def write_to_user(self, user: str, envelope: dict[str, Any], exclude: str | None) -> int:
        """This node's half of ``notify_user``: encoded once per encoding, however many devices. A presence
        change of a device held by another node is noted here too, so ``devices`` answers it."""
        if envelope.get("op") == "presence":
            self._note_presence(envelope)
        frames: dict[str, tuple[bytes, bool]] = {}
        receivers = cast("list[LiveSession]", self.routing.select(user, fast_routing.SELECT_ALL, True, False,
                                                                  exclude))
        for receiver in receivers:
            receiver.send_shared(envelope, frames)
        return len(receivers)

    def write_to_device(self, user: str, device: str, envelope: dict[str, Any]) -> bool:
        session = self.online(user, device)
        if session is None:
            return False
        session.send_control(envelope)
        return True

    # ---- presence ---------------------------------------------------------------------

    def _note_presence(self, envelope: dict[str, Any]) -> None:
        device, status = envelope.get("device"), envelope.get("status")
        record = self.registry.get(device) if isinstance(device, str) else None
        if record is None or self.routing.get(record.user, record.id) is not None:
            return  # unknown here, or held here: this node's own presence is already current
        if status in (STATUS_OFFLINE, STATUS_REVOKED):
            self.presence.pop(record.id, None)
        else:
            self.presence[record.id] = str(status)
        record.status = str(status) if status != STATUS_REVOKED else record.status
        if isinstance(envelope.get("last_seen"), int):
            record.last_seen = max(record.last_seen, envelope["last_seen"])

    def set_presence(self, user: str, device: str, status: str, now: int, announce: bool = False) -> None:
        """Record a device's status; its user's other online devices hear of a change, once (or, with
        ``announce``, whatever this node thought before: it speaks for a node that died)."""
        previous = self.presence.get(device, STATUS_OFFLINE)
        if status in (STATUS_OFFLINE, STATUS_REVOKED):
            self.presence.pop(device, None)
        else:
            self.presence[device] = status
        if status == previous and not announce:
            return
        record = self.registry.get(device)
        if record is not None:
            record.last_seen = now
            if status != STATUS_REVOKED:
                record.status = status
                self.presence_writes[device] = (status, now)
        self.notify_user(user, {"op": "presence", "device": device, "status": status, "last_seen": now}, device)

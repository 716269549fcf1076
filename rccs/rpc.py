"""RPC between a user's devices: ``call`` and ``result`` (docs/protocol.md section 13).

Theory of operation: a ``call`` names one online device of the caller's user
(its selector is resolved with pick-one semantics: the most recently active
match). The server gives the call an id of its own towards the target, so the
ids of different callers never clash, remembers the call (server id -> caller
connection and the caller's id, target connection, timer) and writes
``{"op":"call","id":<server id>,"from":..,"method":..,"params":..,"deadline":..}``
to the target. The target's ``result`` with that id is written to the caller
under the caller's id.

A call ends with the first of: the target's result (relayed), its timeout (the
caller gets ``error`` ``timeout``), the end of the target's connection
(``disconnected``), or the end of the caller's connection (nothing to tell).
A call that ended without a result stays known to the server until
``LATE_RESULT_GRACE`` seconds after its deadline, so that the asked device's
late result is dropped quietly instead of being refused. Calls are live only:
nothing is written to the store, and the state lives in the node's ``Rpc``
feature (its ``RpcRegistry``).

``params`` and ``result`` are envelope fields (not ``body``): they are decoded
by the server and encoded again for the other side, converted between JSON and
msgpack as in section 6.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import TYPE_CHECKING, Any

import msgpack

from .errors import ErrorCode, ProtocolError
from .protocol import MAX_ID_CHARS, MSGPACK, check_message_id, json_dumps, parse_selector, to_json_value

if TYPE_CHECKING:
    from .contracts import Conn, Handler
    from .hub import Hub


DEFAULT_TIMEOUT = 30.0  # seconds a caller waits for the result when the call names no timeout
MAX_TIMEOUT = 300.0  # the longest timeout a call may ask for
LATE_RESULT_GRACE = 60.0  # seconds after its deadline that a late result is still dropped quietly
MAX_METHOD_CHARS = MAX_ID_CHARS
MAX_ERROR_CODE_CHARS = MAX_ID_CHARS
RESULTS = "rpc.result"  # broker channel: a result for a call made from a device of another node

class Call:
    """One call: waiting for its result, or (``caller`` None) ended and waiting only for a late result."""

    __slots__ = ("call_id", "caller", "caller_id", "deadline", "overdue", "target", "timer")

    def __init__(self, call_id: str, caller: Conn, caller_id: str | int, target: Conn, deadline: int):
        self.call_id = call_id  # the server's id, known to the target
        self.caller: Conn | None = caller  # None once the caller no longer waits (timeout, gone)
        self.caller_id = caller_id  # the caller's id, echoed in its result or error
        self.target = target
        self.deadline = deadline  # ms since the epoch
        self.overdue = False  # the deadline passed: the timer now counts down LATE_RESULT_GRACE
        self.timer: asyncio.TimerHandle | None = None


class RpcRegistry:
    """The calls of one hub, by server id and indexed by caller and target connection."""

    def __init__(self) -> None:
        self.calls: dict[str, Call] = {}
        self.by_caller: dict[Conn, dict[str | int, Call]] = {}  # only calls whose caller still waits
        self.by_target: dict[Conn, dict[str, Call]] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self.calls)

    def new_id(self) -> str:
        return f"c{next(self._ids)}"

    def waiting(self, caller: Conn, caller_id: str | int) -> bool:
        calls = self.by_caller.get(caller)
        return calls is not None and caller_id in calls

    def add(self, call: Call) -> None:
        assert call.caller is not None
        self.calls[call.call_id] = call
        self.by_caller.setdefault(call.caller, {})[call.caller_id] = call
        self.by_target.setdefault(call.target, {})[call.call_id] = call

    def release_caller(self, call: Call) -> Conn | None:
        """The caller stops waiting for ``call``; returns the caller (None if it had already stopped)."""
        caller = call.caller
        if caller is not None:
            call.caller = None
            _pop_nested(self.by_caller, caller, call.caller_id)
        return caller

    def discard(self, call: Call) -> None:
        """Forget ``call`` for good and stop its timer."""
        if self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]
        self.release_caller(call)
        _pop_nested(self.by_target, call.target, call.call_id)
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None


def _pop_nested(index: dict[Conn, dict[Any, Call]], session: Conn, key: str | int) -> None:
    calls = index.get(session)
    if calls is not None:
        calls.pop(key, None)
        if not calls:
            del index[session]


class Rpc:
    """The calls of one node and the ``call``/``result`` ops."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.registry = RpcRegistry()
        self.ops: dict[str, Handler] = {"call": self.op_call, "result": self.op_result}

    def op_call(self, session: Conn, header: dict[str, Any]) -> None:
        op_call(self, session, header)

    def op_result(self, session: Conn, header: dict[str, Any]) -> None:
        op_result(self, session, header)

    def on_close(self, session: Conn) -> None:
        on_closed(self, session)

    def on_result_from_elsewhere(self, result: dict[str, Any]) -> None:
        on_result_from_elsewhere(self, result)


# ---- parsing ---------------------------------------------------------------


def _text(value: Any, field: str, limit: int) -> str:
    if not isinstance(value, str) or not value:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{field}' must be a non-empty string")
    if len(value) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'{field}' is longer than {limit} characters")
    return value


def parse_timeout(value: Any) -> float:
    """Seconds a call may wait: default DEFAULT_TIMEOUT, more than 0 and at most MAX_TIMEOUT."""
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'timeout' must be a positive number of seconds")
    if value > MAX_TIMEOUT:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'timeout' is longer than {MAX_TIMEOUT:g} seconds")
    return float(value)


def parse_error(value: Any) -> dict[str, str]:
    """A result's ``error``: ``code`` (1-128 chars) and an optional ``message``; other keys are dropped."""
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'error' must be a map with 'code' and 'message'")
    code = _text(value.get("code"), "error.code", MAX_ERROR_CODE_CHARS)
    message = value.get("message", "")
    if not isinstance(message, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'error.message' must be a string")
    return {"code": code, "message": message}


# ---- encoding --------------------------------------------------------------


def _encode(session: Conn, envelope: dict[str, Any], what: str) -> tuple[bytes, bool]:
    """``envelope`` as a frame in ``session``'s encoding; ProtocolError(unconvertible) if it cannot be."""
    if session.encoding == MSGPACK:
        try:
            return msgpack.packb(envelope, use_bin_type=True), False
        except (OverflowError, ValueError, TypeError) as exc:
            raise ProtocolError(ErrorCode.UNCONVERTIBLE, f"'{what}' cannot be encoded as msgpack: {exc}") from None
    try:
        return json_dumps(envelope), True
    except ValueError:  # NaN or an infinity from a msgpack sender: convert as for bodies (section 6)
        return json_dumps(to_json_value(envelope)), True
    except RecursionError:
        raise ProtocolError(ErrorCode.UNCONVERTIBLE, f"'{what}' is nested too deeply") from None


def _write(session: Conn, frame: tuple[bytes, bool]) -> None:
    if session.state_is_open():
        session.send_frame(frame[0], frame[1])


# ---- ops -------------------------------------------------------------------


def op_call(rpc: Rpc, session: Conn, header: dict[str, Any]) -> None:
    hub = rpc.hub
    assert session.device is not None and session.user is not None
    caller_id = check_message_id(header.get("id"))
    method = _text(header.get("method"), "method", MAX_METHOD_CHARS)
    timeout = parse_timeout(header.get("timeout"))
    selector = parse_selector(header.get("to"))
    registry = rpc.registry
    if registry.waiting(session, caller_id):
        raise ProtocolError(ErrorCode.DUPLICATE_ID, "a call with this id is still waiting for its result")
    # the one online device a call goes to: the most recently active match
    exclude = None if selector.include_self else session.device
    target = hub.router.resolve_one(session.user, selector, exclude)
    elsewhere_name = hub.router.resolve_elsewhere(session.user, selector, exclude) if target is None else None
    # stands where the target's connection would (a Conn for the call's bookkeeping)
    elsewhere: Any = None if elsewhere_name is None else DeviceElsewhere(elsewhere_name)
    if target is None and elsewhere is None:
        hub.events["rpc_offline"] += 1
        raise ProtocolError(ErrorCode.OFFLINE, "no online device matched 'to': the call reached nobody")
    loop = asyncio.get_running_loop()
    deadline = hub.now() + int(timeout * 1000)
    if target is None:
        assert elsewhere is not None
        # Another node holds the device: the call goes there through the broker, its result comes back
        # on RESULTS. The id names this node, so that node knows where to send the result.
        call = Call(f"{registry.new_id()}@{hub.node_id}", session, caller_id, elsewhere, deadline)
        envelope = {"op": "call", "id": call.call_id, "from": session.device, "method": method,
                    "params": header.get("params"), "deadline": deadline}
        registry.add(call)
        call.timer = loop.call_later(timeout, _on_timer, hub, registry, call)
        hub.events["rpc_calls"] += 1
        hub.router.send_to_device(session.user, elsewhere.device or "", envelope)
        return
    call = Call(registry.new_id(), session, caller_id, target, deadline)
    frame = _encode(target, {"op": "call", "id": call.call_id, "from": session.device, "method": method,
                             "params": header.get("params"), "deadline": call.deadline}, "params")
    registry.add(call)
    call.timer = loop.call_later(timeout, _on_timer, hub, registry, call)
    hub.events["rpc_calls"] += 1
    _write(target, frame)


class DeviceElsewhere:
    """The target of a call whose device another node holds (stands where the target's connection would)."""

    __slots__ = ("device",)

    def __init__(self, device: str):
        self.device: str | None = device


def _on_timer(hub: Hub, registry: RpcRegistry, call: Call) -> None:
    """At the deadline the caller hears ``timeout``; LATE_RESULT_GRACE later the call is forgotten."""
    if registry.calls.get(call.call_id) is not call:
        return
    if call.overdue:
        call.timer = None
        registry.discard(call)
        return
    call.overdue = True
    call.timer = asyncio.get_running_loop().call_later(LATE_RESULT_GRACE, _on_timer, hub, registry, call)
    caller = registry.release_caller(call)
    if caller is not None:
        hub.events["rpc_timeouts"] += 1
        caller.send_error(ErrorCode.TIMEOUT, f"no result from {call.target.device!r} in time", call.caller_id)


def op_result(rpc: Rpc, session: Conn, header: dict[str, Any]) -> None:
    hub = rpc.hub
    call_id = check_message_id(header.get("id"))
    error = None
    if "error" in header:
        if "result" in header:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "a result holds either 'result' or 'error', not both")
        error = parse_error(header["error"])
    registry = rpc.registry
    call = registry.calls.get(call_id) if isinstance(call_id, str) else None
    if call is None and isinstance(call_id, str) and hub.broker.spans_nodes:
        node = call_id.rpartition("@")[2]
        if node and node != hub.node_id:  # a call from a device of another node: its result goes back there
            result: dict[str, Any] = {"id": call_id, "user": session.user, "from": session.device}
            if error is not None:
                result["error"] = error
            else:
                result["result"] = header.get("result")
            hub.broker.publish(RESULTS, result)
            return
    if call is None or call.target is not session:
        raise ProtocolError(ErrorCode.UNKNOWN_CALL, "no call with this id waits for a result from this connection")
    _relay(rpc, call, session.device, error, header.get("result"))


def on_result_from_elsewhere(rpc: Rpc, result: dict[str, Any]) -> None:
    """A result another node received for a call made here."""
    call = rpc.registry.calls.get(result.get("id"))  # type: ignore[arg-type]
    if call is None or not isinstance(call.target, DeviceElsewhere) or call.target.device != result.get("from"):
        return
    if call.caller is not None and call.caller.user != result.get("user"):
        return
    _relay(rpc, call, result.get("from"), result.get("error"), result.get("result"))


def _relay(rpc: Rpc, call: Call, answered_by: str | None, error: dict[str, str] | None, value: Any) -> None:
    """Give the caller the result of ``call`` (or drop it quietly if the caller stopped waiting)."""
    hub = rpc.hub
    registry = rpc.registry
    caller = call.caller
    if caller is None:  # the caller stopped waiting (timeout, or its connection ended): dropped quietly
        registry.discard(call)
        hub.events["rpc_late_results"] += 1
        return
    answer: dict[str, Any] = {"op": "result", "id": call.caller_id, "from": answered_by}
    if error is not None:
        answer["error"] = error
    else:
        answer["result"] = value
    registry.discard(call)
    try:
        frame = _encode(caller, answer, "result")
    except ProtocolError as exc:
        hub.events["rpc_unconvertible"] += 1
        caller.send_error(ErrorCode.UNCONVERTIBLE, f"the result from {answered_by!r} cannot be converted: "
                          f"{exc.message}", call.caller_id)
        raise ProtocolError(ErrorCode.UNCONVERTIBLE, f"{exc.message}; the caller was told") from None
    hub.events["rpc_results"] += 1
    _write(caller, frame)


def on_closed(rpc: Rpc, session: Conn) -> None:
    """A connection ended: calls it made or was asked to answer are settled."""
    registry = rpc.registry
    hub = rpc.hub
    asked = registry.by_target.get(session)
    if asked:
        for call in list(asked.values()):
            caller = registry.release_caller(call)
            registry.discard(call)
            if caller is not None and caller is not session:
                hub.events["rpc_disconnected"] += 1
                caller.send_error(ErrorCode.DISCONNECTED, f"{session.device!r} went away before it answered",
                                  call.caller_id)
    made = registry.by_caller.get(session)
    if made:
        for call in list(made.values()):
            registry.release_caller(call)  # a late result from the target is dropped quietly
            hub.events["rpc_abandoned"] += 1

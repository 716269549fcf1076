"""RPC between a user's devices: ``call`` and ``result`` (to be filled in)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import Session

RPC_OPS: dict[str, Callable[[Session, dict[str, Any]], None]] = {}


def on_closed(session: Session) -> None:
    """A connection ended: calls it made or was asked to answer are settled."""

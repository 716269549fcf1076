"""Cross-device state documents: ``state.*`` ops (to be filled in)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import Session

STATE_OPS: dict[str, Callable[[Session, dict[str, Any]], None]] = {}


def on_closed(session: Session) -> None:
    """A connection ended: its subscriptions end, its ``live/`` documents go away."""

"""Logging for ``rccs serve``: JSON lines or readable text, with secrets taken out of every record.

``configure_logging(settings)`` puts one handler on the root logger. Its format follows the
``log_format`` setting: ``json`` writes one JSON object per line, ``text`` one readable line per
record, and ``auto`` (the default) text when the stream is a terminal and JSON lines otherwise
(a pipe, a file, journald, a container runtime).

A JSON line holds ``ts`` (ISO-8601 UTC with milliseconds), ``level``, ``logger`` and ``msg``, then
every structured field the call site passed with ``extra=`` (``peer``, ``device``, ``user``,
``session``, ...), then ``exc`` (the formatted traceback) and ``stack`` when the record has them::

    {"ts": "2026-11-25T14:03:07.123Z", "level": "INFO", "logger": "rccs.events",
     "msg": "device.connected user=alice device=alice-phone ...", "user": "alice", "device": "alice-phone"}

Before any formatting, the handler's ``RedactingFilter`` replaces secrets in the message, in the
``extra`` fields, in the traceback and in the stack: device credentials (``rccs_`` and 43 URL-safe
characters), JWTs (dev tokens: three base64url segments, the first starting ``eyJ``), anything
following ``Bearer``, and the configured values of ``admin_key``, ``token_secret`` and
``webhook_secret``. Pairing codes are left alone: they live minutes, work once, and an operator
may need to match them against a user's report.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

from .config import Settings

# Attributes every LogRecord has (and those the Formatter adds): anything else came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}
# The keys a JSON line always has; an ``extra`` field of the same name is written with a "_" appended.
_CORE_KEYS = ("ts", "level", "logger", "msg", "exc", "stack")

_URLSAFE = r"[A-Za-z0-9_-]"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Anything after "Bearer" up to white space or a quote: an Authorization header, however it got here.
    # (Not a value redacted already, such as the admin key: "Bearer [redacted admin_key]".)
    (re.compile(r"\b(Bearer)(\s+)(?!\[redacted)[^\s\"']+", re.IGNORECASE), r"\1\2[redacted]"),
    # A device credential: rccs_ + 43 URL-safe characters (32 random bytes).
    (re.compile(rf"rccs_{_URLSAFE}{{43}}"), "[redacted credential]"),
    # A JWT: base64url header (a JSON object, so "eyJ"), payload and signature.
    (re.compile(rf"eyJ{_URLSAFE}*\.{_URLSAFE}+\.{_URLSAFE}*"), "[redacted token]"),
)
_REDACTED_SETTINGS = ("admin_key", "token_secret", "webhook_secret")
_PLAIN = logging.Formatter()  # renders tracebacks the standard way, for the filter to redact


class RedactingFilter(logging.Filter):
    """Rewrites each record so that no secret reaches a formatter; never drops a record.

    The message is rendered (``msg % args``) and redacted, and ``args`` emptied; ``extra`` string
    values are redacted, in nested lists and dicts too (other objects as their ``str()`` when that
    holds a secret); the traceback is rendered into ``exc_text`` and redacted, and so is
    ``stack_info``. Redacting twice changes nothing, so the filter may sit on several handlers.
    """

    def __init__(self, secrets: Iterable[tuple[str, str]] = ()):
        """``secrets``: (name, value) pairs replaced wherever they appear, e.g. ("admin_key", key)."""
        super().__init__()
        literals: list[tuple[str, str]] = []
        for name, value in secrets:
            if not value:
                continue
            replacement = f"[redacted {name}]"
            # The value as it is, and as repr() or json.dumps() would write it inside quotes.
            for form in {value, repr(value)[1:-1], json.dumps(value)[1:-1]}:
                literals.append((form, replacement))
        # Longest first, so that a secret containing another is replaced whole.
        self._literals = sorted(literals, key=lambda item: len(item[0]), reverse=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedactingFilter:
        return cls((name, str(getattr(settings, name))) for name in _REDACTED_SETTINGS)

    def redact(self, text: str) -> str:
        for value, replacement in self._literals:
            if value in text:
                text = text.replace(value, replacement)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: keep what there is, readable
            message = f"{record.msg!s} (log arguments that do not fit: {record.args!r})"
        record.msg = self.redact(message)
        record.args = ()
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRIBUTES:
                setattr(record, key, self._redact_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True

    def _redact_value(self, value: Any, depth: int = 0) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.redact(value)
        if depth < 8 and isinstance(value, Mapping):
            return {self.redact(str(k)): self._redact_value(v, depth + 1) for k, v in value.items()}
        if depth < 8 and isinstance(value, list | tuple | set | frozenset):
            return [self._redact_value(v, depth + 1) for v in value]
        text = str(value)
        redacted = self.redact(text)
        return value if redacted == text else redacted


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call site passed with ``extra=``, in the order they were given."""
    return {key: value for key, value in vars(record).items()
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_")}


def _jsonable(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # NaN and Infinity are not JSON
    if depth < 8 and isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if depth < 8 and isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v, depth + 1) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped), ASCII only."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            line[key + "_" if key in _CORE_KEYS else key] = _jsonable(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # ASCII: the line stays valid JSON whatever the stream's encoding does with other characters.
        return json.dumps(line, ensure_ascii=True, separators=(", ", ": "))


class TextFormatter(logging.Formatter):
    """``2026-11-25T14:03:07.123Z INFO rccs.node: message key=value ...`` for a person at a terminal.

    ``extra`` fields follow the message as ``key=value``, except those the message already shows.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        shown = [f"{key}={value}" for key, value in extra_fields(record).items()]
        fields = " ".join(field for field in shown if field not in message)
        text = f"{_timestamp(record)} {record.levelname} {record.name}: {message}" + (f" {fields}" if fields else "")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def resolve_format(log_format: str, stream: IO[str]) -> str:
    """``json`` or ``text``: what ``log_format`` means for this stream (``auto``: text on a terminal)."""
    if log_format == "auto":
        return "text" if _is_terminal(stream) else "json"
    if log_format not in ("json", "text"):
        raise ValueError(f"setting 'log_format' must be 'auto', 'json' or 'text', not {log_format!r}")
    return log_format


class LogHandler(logging.StreamHandler[IO[str]]):
    """The handler ``configure_logging`` installs (a class of its own, so a second call can find it)."""


def make_handler(settings: Settings, stream: IO[str] | None = None) -> LogHandler:
    """A stream handler (standard error by default) with the redacting filter and the chosen formatter."""
    stream = sys.stderr if stream is None else stream
    handler = LogHandler(stream)
    handler.addFilter(RedactingFilter.from_settings(settings))
    formatter = JsonFormatter() if resolve_format(settings.log_format, stream) == "json" else TextFormatter()
    handler.setFormatter(formatter)
    return handler


def configure_logging(settings: Settings, stream: IO[str] | None = None) -> LogHandler:
    """Set up the process's logging for ``rccs serve``; returns the handler put on the root logger.

    The level is ``log_level``; a handler this function installed before is replaced, others stay.
    Python warnings are logged too (so a JSON stream holds nothing but JSON), and picows' one INFO
    line per accepted connection only shows at DEBUG.
    """
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"setting 'log_level': unknown level {settings.log_level!r}")
    handler = make_handler(settings, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, LogHandler):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    # picows logs every accepted connection at INFO; keep that for DEBUG runs.
    logging.getLogger("picows").setLevel(logging.WARNING if level > logging.DEBUG else logging.NOTSET)
    return handler

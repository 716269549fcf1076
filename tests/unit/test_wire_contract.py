"""A client written from docs/protocol.md alone never meets a name the docs do not define.

Every name the server can put on the wire or in its metrics and webhooks is enumerated from the code's own
tables (the error and close code enums, the ops tables, the event kinds, the routing results, the settings
object) or, where the code has no table, from its source (the ``op`` and receipt ``status`` literals, the
fields of each ``emit()``), and looked up in the documentation. Where the docs list names in a table, the
reverse holds too: a documented name the code no longer has is a stale doc.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

from rccs._fastpath import routing as fast_routing
from rccs.cli import _server_flags
from rccs.config import Settings
from rccs.errors import CloseCode, ErrorCode, ReceiptReason
from rccs.events import EVENT_KINDS, WEBHOOK_RESULTS
from rccs.node import Node
from rccs.protocol import SELECTOR_KEYS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "rccs"
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
# The server's source: everything under rccs/ but the Python client, which speaks the protocol from the
# other side (its literals are what it sends, not what the server says).
SERVER_SOURCES = sorted(path for path in PACKAGE.rglob("*.py") if path.name != "client.py")
ENVELOPE_FIELDS_EVERY_EVENT = {"event", "at"}
NO_FLAG = "\N{EN DASH}"  # what the settings reference shows for a setting without a flag


# ---- reading the docs ------------------------------------------------------------------------


def section(text: str, heading: str) -> str:
    """The body of the markdown section whose heading line starts with ``heading`` (``## 7.``, ``### 5.2``),
    up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    lines = text.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith(heading)]
    assert starts, f"no section {heading!r}"
    start = starts[0]
    end = start + 1
    while end < len(lines):
        match = re.match(r"^(#+) ", lines[end])
        if match and len(match.group(1)) <= len(level):
            break
        end += 1
    return "\n".join(lines[start + 1:end])


def table_rows(text: str, first_header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table in ``text`` whose first header cell is
    ``first_header``."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[index + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table starting with column {first_header!r}")


def code_names(cell: str) -> set[str]:
    """The `backticked` names of a table cell."""
    return set(re.findall(r"`([^`]+)`", cell))


def first_column(text: str, first_header: str) -> set[str]:
    names: set[str] = set()
    for row in table_rows(text, first_header):
        names |= code_names(row[0]) or {row[0]}
    return names


# ---- reading the code ------------------------------------------------------------------------


def parsed_sources() -> Iterator[tuple[Path, ast.Module]]:
    for path in SERVER_SOURCES:
        yield path, ast.parse(path.read_text(), filename=str(path))


def constant_strings(node: ast.AST) -> set[str]:
    """The string constants a value expression can be: ``"a"``, ``"a" if x else "b"``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return constant_strings(node.body) | constant_strings(node.orelse)
    return set()


def dict_literal_fields(node: ast.Dict) -> dict[str, ast.expr]:
    return {key.value: value for key, value in zip(node.keys, node.values, strict=True)
            if isinstance(key, ast.Constant) and isinstance(key.value, str)}


def envelopes_in_code() -> Iterator[tuple[str, dict[str, ast.expr], str]]:
    """(op, fields, where) of every envelope the server's code writes as a dict literal with an ``op``."""
    for path, tree in parsed_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                fields = dict_literal_fields(node)
                for op in constant_strings(fields.get("op", ast.Constant(None))):
                    yield op, fields, f"{path.relative_to(ROOT)}:{node.lineno}"


def call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def receipt_statuses_in_code() -> dict[str, str]:
    """Every receipt ``status`` the server's code can write -> one place that writes it. Receipts are dict
    literals with ``"op": "receipt"``, ``receipt(id, status, ...)`` (rccs.protocol), or inbox writes whose
    status is the receipt sent once the message is committed (``enqueue(message, status)``)."""
    found: dict[str, str] = {}
    for op, fields, where in envelopes_in_code():
        if op == "receipt" and "status" in fields:
            for status in constant_strings(fields["status"]):
                found.setdefault(status, where)
    for path, tree in parsed_sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = call_name(node)
            # receipt(id, status, ...) and Deliveries.enqueue(message, status)
            if (name == "receipt" and len(node.args) >= 2) or (name == "enqueue" and len(node.args) == 2):
                values = constant_strings(node.args[1])
            elif name == "_enqueue":  # Messaging._enqueue(..., status, failures)
                values = set().union(*(constant_strings(arg) for arg in node.args))
            else:
                continue
            for status in values:
                found.setdefault(status, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def emitted_events() -> dict[str, set[str]]:
    """Every ``bus.emit(kind, **fields)`` of the server: kind -> the field names given."""
    events: dict[str, set[str]] = {}
    for _, tree in parsed_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and call_name(node) == "emit" and node.args:
                for kind in constant_strings(node.args[0]):
                    events.setdefault(kind, set()).update(k.arg for k in node.keywords if k.arg is not None)
    return events


def counted_event_labels() -> set[str]:
    """The ``event`` label values of rccs_events_total: every ``events["name"] += 1`` of the server."""
    labels: set[str] = set()
    for _, tree in parsed_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Subscript):
                target = node.target
                owner = target.value
                if isinstance(owner, ast.Attribute) and owner.attr == "events":
                    labels |= constant_strings(target.slice)
    return labels


# ---- the protocol ----------------------------------------------------------------------------


def test_every_error_code_has_a_row_in_section_5_3_and_every_row_is_a_code():
    documented = first_column(section(PROTOCOL, "### 5.3"), "code")
    assert documented == {code.value for code in ErrorCode}


def test_every_close_code_has_a_row_in_section_7_and_every_row_is_a_code():
    documented = {int(name) for name in first_column(section(PROTOCOL, "## 7."), "code")}
    assert documented == {int(code) for code in CloseCode}


def test_every_receipt_status_the_server_writes_has_a_row_in_section_5_2():
    documented = first_column(section(PROTOCOL, "### 5.2"), "status")
    in_code = receipt_statuses_in_code()
    undocumented = {status: where for status, where in in_code.items() if status not in documented}
    assert not undocumented, f"receipt statuses missing from protocol.md 5.2: {undocumented}"
    assert documented == set(in_code), f"documented but never sent: {documented - set(in_code)}"


def test_every_failure_reason_has_a_row_in_section_5_2():
    documented = first_column(section(PROTOCOL, "### 5.2"), "reason")
    assert documented == {reason.value for reason in ReceiptReason}


def test_every_final_receipt_status_is_named_by_the_final_receipt_rule():
    """Section 4.2 tells a sender when it holds every final receipt: each final status must be in it."""
    rule = section(PROTOCOL, "### 4.2")
    for status in ("delivered", "expired", "failed", "retracted", "moved"):
        assert f"`{status}`" in rule, status


def documented_ops() -> set[str]:
    """Op names protocol.md shows on the wire (``"op":"name"``) or as a heading."""
    shown = set(re.findall(r'"op":\s*"([^"]+)"', PROTOCOL))
    for heading in re.findall(r"^#+ .*$", PROTOCOL, flags=re.MULTILINE):
        shown |= code_names(heading)
    return shown


def test_every_op_a_client_may_send_is_documented(tmp_path):
    node = Node(Settings(data_dir=str(tmp_path), store="memory"))
    accepted = set(node.hub.ops) | set(node.hub.hello_ops) | {"hello"}
    assert not accepted - documented_ops(), f"ops the server takes but protocol.md does not show: " \
        f"{sorted(accepted - documented_ops())}"


def test_every_op_the_server_writes_is_documented():
    written = {op: where for op, _, where in envelopes_in_code()}
    assert {"msg", "receipt", "retract", "error", "welcome", "presence", "handoff.offer"} <= set(written)
    missing = {op: where for op, where in written.items() if op not in documented_ops()}
    assert not missing, f"ops the server writes but protocol.md does not show: {missing}"


def test_the_retract_op_and_first_ack_are_documented():
    assert "first_ack" in code_names(" ".join(row[0] for row in table_rows(section(PROTOCOL, "### 4.2"), "field")))
    retract = section(PROTOCOL, "### 5.6")
    assert '"op":"retract"' in retract
    for field in ("seq", "id", "from"):
        assert f"`{field}`" in retract, field


def keys_read(function_names: set[str], source: Path, variable: str) -> set[str]:
    """The string keys the named functions of ``source`` read from ``variable`` (``variable.get("key")``)."""
    keys: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name in function_names:
            for call in ast.walk(node):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "get"
                        and isinstance(call.func.value, ast.Name) and call.func.value.id == variable and call.args):
                    keys |= constant_strings(call.args[0])
    return keys


def test_every_field_of_send_and_key_of_a_selector_is_in_section_4_2():
    send = section(PROTOCOL, "### 4.2")
    fields = first_column(send, "field")
    read = keys_read({"send"}, PACKAGE / "messaging.py", "header") | keys_read(
        {"parse_delivery_options"}, PACKAGE / "protocol.py", "header")
    assert {"id", "to", "type", "ack", "ttl", "first_ack"} <= read
    assert read <= fields, f"send fields the server reads but 4.2 does not list: {sorted(read - fields)}"
    keys = first_column(send, "key")
    selector = set(SELECTOR_KEYS) | keys_read({"parse_selector", "selector_order"}, PACKAGE / "protocol.py", "to")
    assert {"pick", "self", "order"} <= selector
    assert selector == keys, f"selector keys: read but not listed {sorted(selector - keys)}, " \
        f"listed but not read {sorted(keys - selector)}"


# ---- operations: settings, metrics, webhooks -------------------------------------------------


def settings_reference() -> dict[str, list[str]]:
    """operations.md's settings reference: setting -> [flag, environment, default, meaning]."""
    rows = table_rows(section(OPERATIONS, "## Settings reference"), "setting")
    reference: dict[str, list[str]] = {}
    for row in rows:
        (name,) = code_names(row[0])
        assert name not in reference, f"{name} has two rows"
        reference[name] = row[1:]
    return reference


def server_flags() -> dict[str, set[str]]:
    """Setting -> the ``rccs serve`` flags that set it."""
    parser = argparse.ArgumentParser()
    _server_flags(parser)
    flags: dict[str, set[str]] = {}
    for action in parser._actions:
        flags.setdefault(action.dest, set()).update(option for option in action.option_strings
                                                    if option.startswith("--"))
    return flags


def documented_default(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_every_setting_has_a_row_with_its_flag_environment_name_and_default():
    reference = settings_reference()
    fields = {field.name: field for field in dataclasses.fields(Settings)}
    assert set(reference) == set(fields), (
        f"settings without a row: {sorted(set(fields) - set(reference))}; "
        f"rows naming no setting: {sorted(set(reference) - set(fields))}")
    flags = server_flags()
    for name, (flag_cell, env_cell, default_cell, meaning) in reference.items():
        if name in flags:
            assert code_names(flag_cell) == flags[name], (name, flag_cell)
        else:
            assert flag_cell == NO_FLAG, (name, flag_cell)
        assert code_names(env_cell) == {f"RCCS_{name.upper()}"}, (name, env_cell)
        default = fields[name].default
        if default == "":
            assert default_cell.startswith("(empty"), (name, default_cell)
        else:
            assert default_cell == f"`{documented_default(default)}`", (name, default_cell, default)
        assert meaning, name


def test_every_setting_protocol_md_names_in_its_limits_tables_exists():
    named: set[str] = set()
    for heading in ("## 9.", "## 12.", "### 14.4", "### 15.4"):
        for row in table_rows(section(PROTOCOL, heading), "what"):
            named |= code_names(row[-1])
    fields = {field.name for field in dataclasses.fields(Settings)}
    assert {"max_message_bytes", "ack_timeout", "max_delivery_attempts", "task_lease_ttl"} <= named
    assert named <= fields, f"protocol.md names settings the server does not have: {sorted(named - fields)}"


def metrics_table() -> dict[str, str]:
    """operations.md's metrics table: metric name -> its labels cell."""
    rows = table_rows(section(OPERATIONS, "## Running and scraping metrics"), "metric")
    return {next(iter(code_names(row[0]))).split("{")[0]: row[1] for row in rows}


def test_every_metric_and_every_label_value_is_documented():
    metrics = metrics_table()
    exported = set(re.findall(r'"(rccs_[a-z_]+)"', (PACKAGE / "metrics.py").read_text()))
    counters = set(re.findall(r'CounterMetricFamily\(\s*"(rccs_[a-z_]+)"', (PACKAGE / "metrics.py").read_text()))
    exported = {name + "_total" if name in counters else name for name in exported}
    assert set(metrics) == exported, (sorted(exported - set(metrics)), sorted(set(metrics) - exported))
    label_values = {
        "rccs_messages_routed_total": set(fast_routing.RESULT_NAMES),
        "rccs_events_total": counted_event_labels(),
        "rccs_webhook_events_total": set(WEBHOOK_RESULTS),
        "rccs_sessions": {"connected", "resumable"},
        "rccs_messages_total": {"in", "out"},
    }
    assert {"routed", "no_route", "offline", "rejected"} <= label_values["rccs_messages_routed_total"]
    assert {"work_moved", "session_opened", "task_claims"} <= label_values["rccs_events_total"]
    for metric, values in label_values.items():
        named = code_names(metrics[metric])
        assert values <= named, f"{metric}: label values not documented: {sorted(values - named)}"
    # These count names whose tables are checked on their own: protocol.md's error and close codes, and
    # the events table below.
    assert "§5.3" in metrics["rccs_errors_total"] and "§7" in metrics["rccs_closes_total"]
    assert "#events-and-webhooks" in metrics["rccs_bus_events_total"]


def webhook_events_table() -> dict[str, set[str]]:
    """operations.md's events table: kind -> its fields (the names that start the cell's comma-separated
    items; what follows a name in parentheses explains it)."""
    rows = table_rows(section(OPERATIONS, "## Events and webhooks"), "event")
    return {next(iter(code_names(row[0]))): set(re.findall(r"(?:^|, )`([a-z_]+)`", row[1])) for row in rows}


def test_every_webhook_event_has_a_row_listing_its_fields():
    table = webhook_events_table()
    assert set(table) == set(EVENT_KINDS)
    emitted = emitted_events()
    assert set(emitted) <= set(EVENT_KINDS), f"emitted but not an event kind: {set(emitted) - set(EVENT_KINDS)}"
    assert set(emitted) == set(EVENT_KINDS), f"event kinds never emitted: {set(EVENT_KINDS) - set(emitted)}"
    for kind, fields in emitted.items():
        assert fields <= table[kind], f"{kind}: fields not documented: {sorted(fields - table[kind])}"
        assert table[kind] <= fields, f"{kind}: documented fields it never has: {sorted(table[kind] - fields)}"
    assert all(f"`{field}`" in section(OPERATIONS, "## Events and webhooks") for field in ENVELOPE_FIELDS_EVERY_EVENT)


"""The layering of docs/architecture.md holds: imports point down, features stay apart, ops live in one table."""

import ast
from pathlib import Path

import pytest

from rccs.config import Settings
from rccs.node import Node, merge_ops

PACKAGE = Path(__file__).resolve().parents[2] / "rccs"
FEATURES = {"rccs.login", "rccs.devices", "rccs.pairing", "rccs.rpc", "rccs.state", "rccs.tasks"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every rccs module -> the rccs modules it imports anywhere (in functions and under TYPE_CHECKING too)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                candidates = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets.update(candidate for candidate in candidates if candidate in modules and candidate != name)
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    assert len(graph) > 30  # the walk found the package
    assert _cycle(graph) is None


def test_a_planted_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_session_and_the_floors_below_the_features_import_no_feature():
    graph = _imports()
    for module in ("rccs.session", "rccs.hub", "rccs.messaging", "rccs.inbox", "rccs.router", "rccs.contracts"):
        assert not graph[module] & FEATURES, module
    for feature in FEATURES:
        assert not graph[feature] & (FEATURES | {"rccs.session"}), feature


def test_every_features_ops_are_in_the_one_table(tmp_path):
    node = Node(Settings(data_dir=str(tmp_path), store="memory"))
    tables = [node.messaging.ops, node.login.ops, node.devices.ops, node.pairing.ops, node.rpc.ops,
              node.state.ops, node.tasks.ops]
    assert set(node.hub.ops) == {name for table in tables for name in table}
    assert {"send", "ack", "refresh", "pair.create", "call", "state.patch", "handoff.accept"} <= set(node.hub.ops)
    assert set(node.hub.hello_ops) == {"pair.redeem"}


def test_an_op_claimed_by_two_features_is_refused():
    def handler(conn, header):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="'devices'"):
        merge_ops({"devices": handler}, {"devices": handler})

import ast
import asyncio
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

from rccs.client import Client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def test_two_devices_example_runs():
    result = subprocess.run([sys.executable, str(EXAMPLES / "two_devices.py")], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "desktop got {'text': 'build it'} from alice-phone" in result.stdout
    assert "[('delivered', 'alice-desktop')]" in result.stdout


def run_example(name):
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_draft_continued_example_runs():
    lines = run_example("draft_continued.py")
    assert lines == [
        "phone saved the draft at rev 2",
        "desktop caught up at rev 2: 'Refactor the parser and keep the tests green'",
        "phone sees rev 3 by alice-desktop: 'Refactor the parser and keep the tests green, then open a pull request'",
        "phone's edit at rev 2 conflicted: the draft is at rev 3",
        "desktop has rev 4 by alice-phone: {'text': 'Refactor the parser and keep the tests green, then open a pull "
        "request', 'to': ['agent', 'bob']}",
    ]


def test_task_handoff_example_runs():
    lines = run_example("task_handoff.py")
    assert lines == [
        "ide ran the agent to step 3 at epoch 1",
        "ide pauses the agent at step 3 for alice-phone",
        "phone is offered the agent at step 3 by alice-ide",
        "the agent moved to alice-phone at epoch 2",
        "phone ran the agent to step 5 at epoch 2",
        "the ide's late write is refused: alice-phone holds epoch 2",
        "phone pauses the agent at step 5 for alice-ide",
        "ide is offered the agent at step 5 by alice-phone",
        "the agent moved back to alice-ide at epoch 3",
        "ide ran the agent to step 6 at epoch 3",
        "progress: {'by': 'ide', 'step': 6}",
    ]


README_URL = "ws://127.0.0.1:8765/v1"


def readme_snippet(containing):
    """The README's ```python block that contains ``containing``, as it is written there."""
    blocks = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), re.S | re.M)
    [block] = [block for block in blocks if containing in block]
    assert README_URL in block
    return block


async def run_snippet(source, server, **names):
    """Run a README snippet as written (top-level await, as in ``python -m asyncio``) against ``server``;
    returns its namespace and what it printed."""
    code = compile(source.replace(README_URL, server.ws_url), "README.md", "exec",
                   flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    namespace = dict(names)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coroutine = eval(code, namespace)  # the project's own README: running it is the point
        if coroutine is not None:
            # Far below the client's 30 s receipt timeout: a snippet that waits for it fails here.
            await asyncio.wait_for(coroutine, 10)
    return namespace, printed.getvalue().splitlines()


async def test_readme_client_snippet_runs_as_written(server):
    _, printed = await run_snippet(readme_snippet("ack=True"), server,
                                   desktop_token=server.issue_token("alice", "alice-desktop"),
                                   phone_token=server.issue_token("alice", "alice-phone"))
    assert printed == ["alice-desktop notification {'text': 'done'}", "[('delivered', 'alice-phone')]"]


async def test_readme_pairing_snippet_runs_as_written(server):
    async with Client(server.ws_url, server.issue_token("alice", "alice-desktop"), {"type": "desktop"}) as desktop:
        code = (await desktop.create_pairing_code())["code"]
        saved = []
        namespace, _ = await run_snippet(readme_snippet("pair(").replace("7KQ2-M9XD", code), server,
                                         save_somewhere=saved.append)
        phone = namespace["phone"]
        try:
            assert saved == [phone.credential] and phone.credential.startswith("rccs_")
            assert {device["id"]: device["type"] for device in await desktop.devices()}[phone.device_id] == "mobile"
        finally:
            await phone.close()

import os
import subprocess
import sys
from pathlib import Path

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

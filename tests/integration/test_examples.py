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

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_daemon_modules_import_without_torch_or_training() -> None:
    """torch is poisoned: any import of it (or of training/) by the serving path fails this test."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None\n"
        "import daemon.app, daemon.commands.serve, daemon.commands.check_config, daemon.commands.camera\n"
        "import daemon.commands.watch, daemon.camera_sim, daemon.sources.folder, daemon.sources.camera\n"
        "import engine.backends.onnxruntime\n"
        "bad = sorted(m for m in sys.modules if m == 'training' or m.startswith('training.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

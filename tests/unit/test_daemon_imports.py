from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_daemon_modules_import_without_torch_or_training() -> None:
    """torch is poisoned: any import of it (or of training/) by the serving path, replay, the tools or the PLC
    bridge fails this test. It covers the imports an import graph cannot see (lazy, through importlib)."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None\n"
        "import daemon.app, daemon.commands.serve, daemon.commands.check_config, daemon.commands.keys\n"
        "import daemon.commands.model, daemon.control, daemon.lifecycle, daemon.loading, daemon.shadow\n"
        "import daemon.sources.folder, daemon.sources.camera, engine.backends.onnxruntime\n"
        "import tools.commands.camera, tools.commands.watch, tools.camera_sim, tools.demo, tools.synth\n"
        "import replay.command, replay.runner, replay.selection, replay.output, replay.report_html\n"
        "import plc.command, plc.bridge, plc.opcua, plc.modbus\n"
        "from inspectd.cli import COMMANDS\n"
        "bad = sorted(m for m in sys.modules if m == 'training' or m.startswith('training.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

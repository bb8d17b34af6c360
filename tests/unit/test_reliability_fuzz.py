"""A short coverage-guided fuzz run (atheris) of what parses camera messages: header, payload, input policy.

Anything but MessageError/InputRejected escaping is a crash (libFuzzer exits non-zero and prints the input).
Skipped where atheris is not installed (it is optional: ``pip install atheris``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("atheris")

REPO = Path(__file__).resolve().parents[2]

TARGET = textwrap.dedent(
    """
    import sys
    import atheris

    with atheris.instrument_imports():
        from daemon.image_policy import InputPolicy, InputRejected
        from daemon.wire import MessageError, parse_message

    POLICY = InputPolicy(max_pixels=1 << 20)

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        header = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        payload = fdp.ConsumeBytes(fdp.remaining_bytes())
        try:
            h, image, encoded = parse_message([header, payload], max_pixels=1 << 20)
            if encoded is not None:
                POLICY.check_encoded(encoded, declared=h.encoding)
            elif image is not None:
                POLICY.check_size(*image.shape)
        except (MessageError, InputRejected):
            pass

    atheris.Setup([sys.argv[0], "-runs=15000", "-max_len=2048", "-seed=1"], one_input)
    atheris.Fuzz()
    """
)


@pytest.mark.timeout(120)
def test_fuzz_the_camera_message_parser(tmp_path: Path) -> None:
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    (seeds / "raw").write_bytes(b'\x40{"frame_id":"a","encoding":"raw","shape":[2,2]}' + bytes(4))
    (seeds / "png").write_bytes(b'\x22{"frame_id":"b","encoding":"png"}\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR')
    script = tmp_path / "fuzz_wire.py"
    script.write_text(TARGET.replace('"-seed=1"]', f'"-seed=1", "{seeds}"]'))
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 15000 runs" in r.stderr

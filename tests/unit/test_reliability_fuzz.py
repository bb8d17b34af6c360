"""Fuzzing what reads camera messages: the header/payload parser, the input policy, and the camera source's
handling of one message — the step whose exceptions used to end the camera thread (issue 16).

- hypothesis (always): structured headers with type confusion and extreme values in every known key, and
  random part counts, through :class:`daemon.sources.camera.CameraSource`'s handling of one message: each
  message is exactly one submitted frame (a REJECT when malformed) or one counted message error, never an
  exception;
- atheris (optional, ``pip install atheris``; skipped without it): a short coverage-guided run of the parser
  and the policy from seeds that include the hostile headers of ``tests/hostile_inputs.py``. Anything but
  MessageError/InputRejected escaping is a crash (libFuzzer exits non-zero and prints the input).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.settings import Backpressure, CameraSettings
from daemon.sources.camera import CameraSource
from daemon.types import Frame
from tests.hostile_inputs import HOSTILE_HEADERS, HUGE_INT, TOLERATED_HEADERS, UNNAMED_HEADERS, encode, gray
from tests.unit.test_daemon_wire import hostile_headers

REPO = Path(__file__).resolve().parents[2]
MAXPIX = 1 << 20


class RecordingIntake:
    """The Intake protocol, recording: what the pipeline would have admitted or counted."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.errors: list[str] = []

    def submit(self, frame: Frame, policy: Backpressure) -> None:
        self.frames.append(frame)

    def wait_for_room(self, timeout: float) -> bool:
        return True

    def message_error(self, kind: str) -> None:
        self.errors.append(kind)


@pytest.fixture(scope="module")
def camera() -> CameraSource:
    # Never started: no socket. Only the handling of one received message is exercised.
    return CameraSource(CameraSettings(), zmq.Context.instance(), max_pixels=MAXPIX)


PNG = encode(gray(32, 32), ".png")
payloads = st.one_of(st.binary(max_size=80), st.just(PNG), st.just(bytes(16)), st.just(bytes(32)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile_headers(), payloads, st.integers(0, 6))
def test_each_message_is_one_verdict_or_one_count_never_an_exception(
    camera: CameraSource, header: tuple[bytes, str | None], payload: bytes, n_parts: int
) -> None:
    raw, fid = header
    parts: list[Any] = [raw, payload][: min(n_parts, 2)]
    intake = RecordingIntake()
    camera._handle(parts, n_parts, 1.0, 1.7e9, intake)
    assert len(intake.frames) + len(intake.errors) == 1
    if fid is not None and n_parts >= 1:  # the part can be named: it gets its verdict
        assert [f.frame_id for f in intake.frames] == [fid]
    for frame in intake.frames:
        # Admitted for inspection only with pixels or bytes that passed the header, payload and policy checks.
        assert frame.error is not None or frame.image is not None or frame.data is not None
        assert frame.error is None or (frame.image is None and frame.data is None)
    assert set(intake.errors) <= {"header", "multipart", "unattributed"}


def test_the_catalogue_of_hostile_headers_through_the_camera(camera: CameraSource) -> None:
    for fid, raw in HOSTILE_HEADERS.items():
        intake = RecordingIntake()
        camera._handle([raw, PNG], 2, 1.0, 1.7e9, intake)
        assert [(f.frame_id, f.error is not None) for f in intake.frames] == [(fid, True)], fid
    for name, raw in UNNAMED_HEADERS.items():
        intake = RecordingIntake()
        camera._handle([raw, PNG], 2, 1.0, 1.7e9, intake)
        assert (intake.frames, intake.errors) == ([], ["header"]), name
    for fid, raw in TOLERATED_HEADERS.items():
        intake = RecordingIntake()
        camera._handle([raw, PNG], 2, 1.0, 1.7e9, intake)
        assert [(f.frame_id, f.error) for f in intake.frames] == [(fid, None)]


# -- atheris: coverage-guided, optional ---------------------------------------------------------------------

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
        header = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8000))
        payload = fdp.ConsumeBytes(fdp.remaining_bytes())
        try:
            h, image, encoded = parse_message([header, payload], max_pixels=1 << 20)
            if encoded is not None:
                POLICY.check_encoded(encoded, declared=h.encoding)
            elif image is not None:
                POLICY.check_size(*image.shape)
        except (MessageError, InputRejected):
            pass

    atheris.Setup([sys.argv[0], "-runs=15000", "-max_len=8192", "-seed=1"], one_input)
    atheris.Fuzz()
    """
)


def _seed(header: bytes, payload: bytes = b"") -> bytes:
    """A libFuzzer input that the target's FuzzedDataProvider splits back into (header, payload): atheris takes
    the integer from the input's last bytes (little-endian here), the bytes from its front."""
    n = min(len(header), 8000)
    return header[:n] + payload + n.to_bytes(2, "little")


@pytest.mark.timeout(150)
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_fuzz_the_camera_message_parser(tmp_path: Path) -> None:
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    (seeds / "raw").write_bytes(_seed(b'{"frame_id":"a","encoding":"raw","shape":[2,2]}', bytes(4)))
    (seeds / "png").write_bytes(
        _seed(b'{"frame_id":"b","encoding":"png"}', b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    )
    for i, raw in enumerate([*HOSTILE_HEADERS.values(), *UNNAMED_HEADERS.values()]):
        if len(raw) <= 8000:
            (seeds / f"hostile-{i}").write_bytes(_seed(raw, PNG[:64]))
    numbers = json.dumps({"frame_id": "n", "encoding": "raw", "shape": [1, 1], "t_capture": 1})
    (seeds / "digits").write_bytes(_seed(numbers.replace(": 1}", f": {HUGE_INT[:4400]}}}").encode()))
    script = tmp_path / "fuzz_wire.py"
    # A crashing input is written to tmp_path (libFuzzer's default is the working directory: the checkout).
    args = f'"-seed=1", "-artifact_prefix={tmp_path}/", "{seeds}"]'
    script.write_text(TARGET.replace('"-seed=1"]', args))
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's daemon/, whatever the venv points at
    r = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=140
    )
    report = "\n".join(ln for ln in r.stderr.splitlines() if "Instrumenting" not in ln)
    assert r.returncode == 0, report[-3000:]
    assert "Done 15000 runs" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_the_seeds_split_as_the_fuzz_target_splits_them() -> None:
    import atheris

    header = HOSTILE_HEADERS["dtype-list"]
    fdp = atheris.FuzzedDataProvider(_seed(header, PNG))
    assert fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8000)) == header
    assert fdp.ConsumeBytes(fdp.remaining_bytes()) == PNG

"""One frame → its row of the batch buffer: decode (when encoded) → the model's preprocessing, in the pool.

Failures are settled right here, so a broken frame never waits for its batch: unreadable or incomplete bytes
(``daemon.image_policy.check_complete``, before the decoder sees them) → REJECT ``decode_error``; the pose
stage's ``no_part``/``pose_error`` → REJECT with that reason; anything unexpected → REJECT ``engine_error``
with the traceback logged. This function never raises (the batch waits on it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from daemon.decision import Rejecter
from daemon.drift import PartImage
from daemon.image_policy import InputRejected, check_complete, sniff
from daemon.ledger import Job, Ledger
from daemon.logs import get_logger
from daemon.types import Reason
from engine.drift import brightness_contrast
from engine.pose import PoseError, PoseParams, estimate_pose
from engine.preprocess import DecodeError, Preprocessor, decode, to_gray8

log = get_logger(__name__)


class FramePreprocessor:
    def __init__(
        self,
        preprocessor: Preprocessor,
        decider: Rejecter,
        ledger: Ledger,
        *,
        max_pixels: int,
        monotonic: Callable[[], float],
        observe_stage: Callable[[str, float], None],
    ) -> None:
        self._pre = preprocessor
        self._decider = decider
        self._ledger = ledger
        self._max_pixels = max_pixels
        self._now = monotonic
        self._observe = observe_stage
        gauges = decider.gauges
        self._gauges = gauges
        self._pose_params = gauges.pose_params() if gauges is not None else PoseParams()
        self._pose_crop = preprocessor.params.pose is not None

    def __call__(self, job: Job, row: np.ndarray) -> None:
        frame = job.frame
        if not self._ledger.is_pending(job):
            return  # decided while it waited (deadline): don't burn a core on it
        t0 = self._now()
        try:
            if frame.image is not None:
                gray = to_gray8(frame.image, max_pixels=self._max_pixels)
            elif frame.data is not None:
                _refuse_partial(frame.data)
                gray = decode(frame.data, max_pixels=self._max_pixels)
            else:
                raise DecodeError("frame carries neither pixels nor encoded bytes")
            t1 = self._now()
            pose = None
            if self._gauges is not None:
                # Measure every part when the package has gauges, even without a pose crop: a part that
                # cannot be measured must not pass a gauge (PoseError → REJECT no_part / pose_error below).
                # The bands are checked by the model that decides the batch (daemon.inference): a gauges-only
                # model change applies from one batch to the next, like any other.
                pose = estimate_pose(gray, self._pose_params)
            crop = self._pre.crop(gray, pose=pose if self._pose_crop else None)
            brightness, contrast = brightness_contrast(crop)  # ~10 µs: for the drift statistics
            self._pre.from_crop(crop, row)
            t2 = self._now()
        except (DecodeError, InputRejected) as exc:
            self._fail(job, Reason.DECODE_ERROR, str(exc))
            return
        except PoseError as exc:
            self._fail(job, _pose_reason(exc), str(exc))
            return
        except (cv2.error, ValueError) as exc:  # OpenCV refusing odd input (size, layout): an input problem
            self._fail(job, Reason.DECODE_ERROR, f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:
            log.exception("preprocessing failed", frame_id=frame.frame_id, source=frame.source)
            self._fail(job, Reason.ENGINE_ERROR, f"preprocessing failed: {type(exc).__name__}: {exc}")
            return
        job.image = PartImage(brightness, contrast, pose.measurements if pose is not None else None)
        job.t_decode_ms = (t1 - t0) * 1000.0
        job.t_pre_ms = (t2 - t1) * 1000.0
        job.ok = True
        self._observe("decode", t1 - t0)
        self._observe("preprocess", t2 - t1)

    def _fail(self, job: Job, reason: Reason, message: str) -> None:
        detail: dict[str, Any] = {"error": message}
        if job.frame.path is not None:
            detail["path"] = job.frame.path
        self._ledger.settle(job, self._decider.reject(job.frame, reason, detail))
        log.warning(
            "frame rejected before inference", frame_id=job.frame.frame_id, reason=reason.value, error=message
        )


def _refuse_partial(data: bytes | memoryview) -> None:
    """A partial image is never decoded, whichever source made the frame: the camera and folder sources have
    already applied the whole input policy (this repeats its cheap completeness walk, 10–150 µs for a 1024²
    image); a replay or an embedding application has not. Formats the policy does not know (a replayed PGM)
    are left to the decoder, as before."""
    try:
        header = sniff(data)
    except InputRejected:
        return
    check_complete(data, header)


def _pose_reason(exc: Exception) -> Reason:
    try:
        return Reason(getattr(exc, "reason", Reason.POSE_ERROR.value))
    except ValueError:
        return Reason.POSE_ERROR

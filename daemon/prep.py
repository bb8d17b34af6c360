"""One frame → its row of the batch buffer: decode (when encoded) → the model's preprocessing, in the pool.

Failures are settled right here, so a broken frame never waits for its batch: unreadable or incomplete bytes
(``daemon.image_policy.check_complete``, before the decoder sees them) → REJECT ``decode_error``; the pose
stage's ``no_part``/``pose_error`` → REJECT with that reason; anything unexpected → REJECT ``engine_error``
with the traceback logged. This function never raises (the batch waits on it).

With ``batching.preprocess_device`` on a GPU the pool stops after the pose (decode, gauges, the crop's pose:
numpy + OpenCV work that stays on the CPU) and leaves the frame on the job (``Job.staged``);
:class:`DevicePreprocessing`, the batch's own last step, then crops, equalises, resizes and normalises the
whole batch in one call of engine.preprocess_torch and writes the rows. It never raises either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from daemon.batcher import Batch

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
        on_device: bool = False,
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
        self._on_device = on_device  # leave crop → normalise to DevicePreprocessing
        crop_pose = preprocessor.params.pose
        self._crop_pose = PoseParams.from_dict(crop_pose) if crop_pose is not None else None

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
            if self._on_device:
                crop_pose = pose if self._pose_crop else None
                if self._crop_pose is not None and crop_pose is None:
                    crop_pose = estimate_pose(gray, self._crop_pose)  # here, not on the inference thread
                job.staged = (gray, crop_pose, pose.measurements if pose is not None else None)
                job.t_decode_ms = (t1 - t0) * 1000.0
                job.t_pre_ms = (self._now() - t1) * 1000.0
                job.ok = True
                self._observe("decode", t1 - t0)
                return
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


class DevicePreprocessing:
    """A batch's last preprocessing step on a GPU: every staged frame of the batch cropped, equalised, resized and
    normalised in one call (engine.preprocess_torch), written into its row. Runs on the inference thread (in
    ``Batch.wait_preprocessed``), before the batch is inferred. A failure rejects the batch's staged frames with
    ``engine_error`` (logged); it never raises."""

    def __init__(
        self,
        device_preprocessor: Any,
        decider: Rejecter,
        ledger: Ledger,
        *,
        monotonic: Callable[[], float],
        observe_stage: Callable[[str, float], None],
    ) -> None:
        self._pre = device_preprocessor
        self._decider = decider
        self._ledger = ledger
        self._now = monotonic
        self._observe = observe_stage

    def __call__(self, batch: Batch) -> None:
        rows, jobs = [], []
        for i, job in enumerate(batch.jobs):
            if job.staged is None:
                continue
            if job.ok and self._ledger.is_pending(job):
                rows.append(i)
                jobs.append(job)
            else:
                job.staged = None
        if not jobs:
            return
        t0 = self._now()
        try:
            prepared = self._pre([j.staged[0] for j in jobs], [j.staged[1] for j in jobs])
            batch.buffer[rows] = prepared.batch.cpu().numpy()
        except Exception as exc:
            log.exception(
                "device preprocessing failed", n=len(jobs), device=str(getattr(self._pre, "device", ""))
            )
            for job in jobs:
                job.ok = False
                job.staged = None
                detail = {"error": f"device preprocessing failed: {type(exc).__name__}: {exc}"}
                self._ledger.settle(job, self._decider.reject(job.frame, Reason.ENGINE_ERROR, detail))
            return
        share_ms = (self._now() - t0) * 1000.0 / len(jobs)
        for job, brightness, contrast in zip(jobs, prepared.brightness, prepared.contrast, strict=True):
            job.image = PartImage(float(brightness), float(contrast), job.staged[2])
            job.t_pre_ms += share_ms
            job.staged = None
            self._observe("preprocess", job.t_pre_ms / 1000.0)


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

"""The two values that flow through the pipeline: a ``Frame`` in, exactly one ``Verdict`` out."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Outcome(enum.StrEnum):
    PASS = "PASS"
    REJECT = "REJECT"


class Reason(enum.StrEnum):
    """Why a verdict is what it is. Everything except ``MODEL`` (and gauges) means: not inspected → REJECT."""

    MODEL = "model"  # the model decided (PASS or REJECT)
    GREY_ZONE = "grey_zone"  # score between the grey-zone bounds: a person re-inspects
    OUT_OF_TOLERANCE = "out_of_tolerance"  # a gauge measurement outside its band
    DECODE_ERROR = "decode_error"  # unreadable / malformed image or message
    NO_PART = "no_part"  # pose: nothing in the image
    POSE_ERROR = "pose_error"  # pose: cannot be normalised (several parts, touching border, implausible)
    DEADLINE = "deadline"  # not decided by arrival + max_latency
    OVERLOAD = "overload"  # refused by the backpressure policy
    ENGINE_ERROR = "engine_error"  # the backend failed for this batch
    SHUTDOWN = "shutdown"  # in flight when the daemon stopped and could not be finished


@dataclass(frozen=True, slots=True)
class Frame:
    """One photographed part. ``t_arrival`` is monotonic (latency); ``t_capture``/``t_received`` wall clock."""

    source: str  # source id, e.g. "camera" or "folder"
    seq: int  # per-source arrival sequence number (1-based)
    frame_id: str  # part / acquisition id (camera header or file name)
    t_arrival: float  # time.monotonic() at arrival: deadlines and latency
    t_received: float  # time.time() at arrival: the record
    t_capture: float | None = None  # camera's wall-clock capture time, when it sent one
    data: bytes | memoryview | None = None  # encoded bytes (png/bmp/…), decoded lazily in the pool
    image: np.ndarray | None = field(default=None, repr=False)  # raw pixels, when the source has them
    label: str | None = None  # ground truth (replay, simulated camera): "OK" | "NG"
    path: str | None = None  # folder source: the file this frame came from
    defect_type: str | None = None
    error: str | None = None  # set by a source that could attribute a malformed message to this frame


@dataclass(frozen=True, slots=True)
class Verdict:
    frame_id: str
    source: str
    outcome: Outcome
    reason: Reason
    score: float | None
    threshold: float
    model: str
    t_capture: float | None
    t_arrival: float
    label: str | None = None
    detail: dict[str, Any] | None = None  # e.g. error message, gauge measurement/band
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage: decode, preprocess, queue, infer

    @property
    def inspected(self) -> bool:
        return self.reason in (Reason.MODEL, Reason.GREY_ZONE, Reason.OUT_OF_TOLERANCE)

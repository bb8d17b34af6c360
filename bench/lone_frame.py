"""What a lone frame's inference costs beyond the hot loop, on the ONNX Runtime session alone (docs/benchmarks.md,
run 11). Run it with nothing else on the machine::

    python -m bench.lone_frame PKG/model.onnx

1. Batch 1 back to back (hot), after 200 ms asleep (a frame at 5 fps), after writing 600 MB of other memory
   (the cache evicted, the core awake), and after 200 ms asleep plus 5 ms of spinning (the core awake, the
   cache as the idle gap left it): cache or core sleep?
2. The same model under other thread settings: batch 1 hot and after 200 ms asleep, then two sessions side by
   side at batch 4 (what two inference workers do at saturation).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _session(path: str, intra: int = 1, inter: int = 1, parallel: bool = False, spin: bool = True) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra
    so.inter_op_num_threads = inter
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The daemon chooses the layout by timing (engine/backends/onnxruntime.py); the patch memory runs without NCHWc.
    return ort.InferenceSession(
        path, so, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"]
    )


def _runner(session: Any, x: np.ndarray) -> Callable[[], None]:
    feed = {session.get_inputs()[0].name: x}
    out = [session.get_outputs()[0].name]
    return lambda: session.run(out, feed)


def _ms(run: Callable[[], None]) -> float:
    t = time.perf_counter()
    run()
    return (time.perf_counter() - t) * 1000.0


def cache_or_sleep(path: str, rounds: int = 15) -> dict[str, list[float]]:
    run = _runner(_session(path), np.zeros((1, 1, *_input_hw(path)), np.float32))
    other = np.ones(600 * 2**20 // 8)
    for _ in range(5):
        run()
    out: dict[str, list[float]] = {
        k: [] for k in ("hot", "asleep 200 ms", "600 MB written", "asleep + spin 5 ms")
    }
    for _ in range(rounds):
        out["hot"].append(_ms(run))
        time.sleep(0.2)
        out["asleep 200 ms"].append(_ms(run))
        other += 1.0
        out["600 MB written"].append(_ms(run))
        time.sleep(0.2)
        t = time.perf_counter()
        while time.perf_counter() - t < 0.005:
            pass
        out["asleep + spin 5 ms"].append(_ms(run))
    return out


def thread_settings(path: str, seconds: float = 6.0) -> list[tuple[str, float, float, float, float]]:
    """(setting, batch-1 hot ms, after 200 ms idle ms, two sessions at batch 4: img/s, core-ms per image)."""
    h, w = _input_hw(path)
    x1 = np.zeros((1, 1, h, w), np.float32)
    x4 = np.zeros((4, 1, h, w), np.float32)
    settings = {
        "1 intra-op thread": {"intra": 1},
        "2 intra-op threads": {"intra": 2},
        "2 intra-op threads, no spinning": {"intra": 2, "spin": False},
        "1 intra-op, 2 inter-op (parallel)": {"intra": 1, "inter": 2, "parallel": True},
    }
    rows = []
    for name, kw in settings.items():
        one = _runner(_session(path, **kw), x1)
        for _ in range(3):
            one()
        hot = [_ms(one) for _ in range(20)]
        idle = []
        for _ in range(20):
            time.sleep(0.2)
            idle.append(_ms(one))
        pair = [_runner(_session(path, **kw), x4) for _ in range(2)]
        img_s, core_ms = _side_by_side(pair, seconds)
        rows.append((name, float(np.median(hot)), float(np.median(idle)), img_s, core_ms))
    return rows


def _side_by_side(pair: list[Callable[[], None]], seconds: float) -> tuple[float, float]:
    """Both runners looping on their own threads for ``seconds``: (img/s, core-ms per image) at batch 4."""
    done = [0] * len(pair)
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            pair[i]()
            done[i] += 4

    c0 = time.process_time()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(pair))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = sum(done)
    return n / seconds, (time.process_time() - c0) / n * 1000.0


def _input_hw(path: str) -> tuple[int, int]:
    shape = _session(path).get_inputs()[0].shape
    return int(shape[2]), int(shape[3])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = argv[0]
    print("| just before the run | median ms | p90 ms |\n|---|---|---|")
    for k, v in cache_or_sleep(path).items():
        print(f"| {k} | {np.median(v):.1f} | {np.quantile(v, 0.9):.1f} |")
    print("\n| session | batch 1 hot (ms) | after 200 ms idle (ms) | two at batch 4 (img/s; core-ms/img) |")
    print("|---|---|---|---|")
    for name, hot, idle, img_s, core_ms in thread_settings(path):
        print(f"| {name} | {hot:.1f} | {idle:.1f} | {img_s:.0f}; {core_ms:.1f} |")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))

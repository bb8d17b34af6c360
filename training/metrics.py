"""Binary-classification metrics with NG as the positive class, in numpy (no scikit-learn dependency)."""

from __future__ import annotations

from typing import Any

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random NG > score of a random OK), ties counting ½."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # Average ranks over ties (Mann–Whitney U).
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_ci(
    scores: np.ndarray, labels: np.ndarray, *, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval, resampling OK and NG separately (keeps the class ratio)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for i in range(n_boot):
        p, n = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        vals[i] = np.mean(p[:, None] > n[None, :]) + 0.5 * np.mean(p[:, None] == n[None, :])
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct threshold, highest threshold first."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return tp / max(int(y.sum()), 1), tp / np.maximum(tp + fp, 1)


def confusion(pred_ng: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    p, y = np.asarray(pred_ng).astype(bool), np.asarray(labels).astype(bool)
    return {
        "tp": int((p & y).sum()),
        "fp": int((p & ~y).sum()),
        "tn": int((~p & ~y).sum()),
        "fn": int((~p & y).sum()),
    }


def at_threshold(pred_ng: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, precision, recall (NG), F1, false-reject rate (OK called NG) and the confusion counts."""
    c = confusion(pred_ng, labels)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {
        "accuracy": (tp + tn) / n if n else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "false_reject_rate": fp / (fp + tn) if fp + tn else float("nan"),
        "escape_rate": fn / (tp + fn) if tp + fn else float("nan"),
        "confusion": c,
    }

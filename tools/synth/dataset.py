"""Labelled datasets on disk (``OK/``, ``NG/`` and ``labels.csv``) and the contact sheet of the docs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tools.synth.defects import DEFECT_TYPES
from tools.synth.render import render_screw

_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 3]  # explicit, so PNG bytes do not depend on OpenCV's default
_CSV_FIELDS = ("file", "label", "defect_type", "seed")


def image_seed(seed: int, index: int, ng: bool) -> int:
    """Per-image seed from (dataset seed, class, index): stable however many images are drawn."""
    return int(np.random.SeedSequence(seed, spawn_key=(int(ng), index)).generate_state(1)[0])


def write_dataset(out: str | Path, n_ok: int, n_ng: int, seed: int, size: int = 1024) -> list[dict[str, Any]]:
    """Write ``out/OK/ok_NNNNN.png``, ``out/NG/<defect>_NNNNN.png`` (NG cycles through DEFECT_TYPES; NNNNN is the
    NG index) and ``out/labels.csv`` (file, label, defect_type, seed). Same arguments ⇒ byte-identical files.

    Returns the rows of labels.csv; ``render_screw(row["seed"], row["defect_type"] or None, size)`` redraws one.
    """
    root = Path(out)
    (root / "OK").mkdir(parents=True, exist_ok=True)
    (root / "NG").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    jobs = [(i, None) for i in range(n_ok)] + [(j, DEFECT_TYPES[j % len(DEFECT_TYPES)]) for j in range(n_ng)]
    for i, kind in jobs:
        s = image_seed(seed, i, ng=kind is not None)
        name = f"NG/{kind}_{i:05d}.png" if kind else f"OK/ok_{i:05d}.png"
        if not cv2.imwrite(str(root / name), render_screw(s, kind, size)[0], _PNG):
            raise OSError(f"could not write {root / name}")
        rows.append({"file": name, "label": "NG" if kind else "OK", "defect_type": kind or "", "seed": s})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def contact_sheet(path: str | Path, seed: int = 0, tile: int = 256) -> Path:
    """Render one OK part and one of each defect type at 1024², and write them as a labelled 2×3 grid PNG.

    Defect boxes are outlined so a reader can find the (deliberately modest) defects at thumbnail size.
    """
    tiles = []
    for i, kind in enumerate((None, *DEFECT_TYPES)):
        img, meta = render_screw(image_seed(seed, i, ng=kind is not None), kind, 1024)
        small = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
        if meta["defect_bbox"] is not None:
            x0, y0, x1, y1 = (round(v * tile / 1024) for v in meta["defect_bbox"])
            cv2.rectangle(small, (x0 - 2, y0 - 2), (x1 + 2, y1 + 2), 255, 1)
        label = np.full((18, tile), 40, np.uint8)
        cv2.putText(label, kind or "OK", (5, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 255, 1, cv2.LINE_AA)
        tiles.append(np.vstack([label, small]))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(
        str(p), np.vstack([np.hstack(tiles[:3]), np.hstack(tiles[3:])]), [cv2.IMWRITE_PNG_COMPRESSION, 9]
    )
    return p

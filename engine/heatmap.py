"""The heat map drawn over what the model saw: one picture for the evaluation report, the replay report and
anyone who asks where a package's NG evidence sits. numpy + OpenCV only."""

from __future__ import annotations

import cv2
import numpy as np


def overlay(img8: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """RGB: the image the network saw, with the positive (NG-evidence) part of the CAM in a colour map."""
    heat = np.maximum(cam.astype(np.float32), 0.0)
    heat = cv2.resize(heat, (img8.shape[1], img8.shape[0]), interpolation=cv2.INTER_LINEAR)
    peak = float(heat.max())
    heat = (255 * heat / peak).astype(np.uint8) if peak > 0 else np.zeros_like(img8)
    colour = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    gray = cv2.cvtColor(img8, cv2.COLOR_GRAY2RGB)
    alpha = (0.55 * heat.astype(np.float32) / 255.0)[..., None]
    return (gray * (1 - alpha) + colour * alpha).astype(np.uint8)

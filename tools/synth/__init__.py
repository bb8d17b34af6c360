"""Procedurally rendered synthetic screws, so tests and demos never need the licensed real photos.

The scene copies screws-300 in style, not photo-realism: a 1024² 8-bit grayscale top view of a silver countersunk
wood screw (conical head with a drive recess, smooth neck, right-hand thread to a pointed tip) on a light mottled
background with a soft cast shadow, at any rotation and position, with sensor noise and per-session lighting.

How it is drawn, and why this way:
- The screw is shaded in its own "canonical" frame (u along the axis from the head face to the tip, y across, in
  pixels), where the silhouette is a radius profile r(u) and the thread is a helix seen from above. There every
  step is a vectorised numpy expression on a small canvas; two 8-bit ``cv2.warpAffine`` calls then place it.
  That keeps a 1024² image under ~50 ms on one core.
- The screw lies on its head rim and thread crests, so its axis is tilted a few degrees: the head's top face shows
  as a thin ellipse and each thread crest as an arc bulging towards the tip, as in the real photos.
- OK parts vary in everything a line varies in (length ±2 %, thread phase, tilt, lighting, position, rotation,
  noise, shadow), and lighting is drawn independently of the class, so no global statistic gives the label away.
- Defects copy the five real types and are local (a few hundred to a few thousand pixels), except
  ``manipulated_front``, which is geometric: the front is cut 8–15 % short (a length gauge must catch it) and
  often bent a few degrees.

Randomness comes only from ``np.random.SeedSequence(seed)``, split into three generators (part, defect, scene), and
no global RNG state is touched: the same seed gives the same image (with the same numpy and OpenCV versions), and
``render_screw(s, defect)`` shows the same part in the same pose and light as ``render_screw(s)``: its OK twin,
which differs only by the defect (handy for tests and for checking what a model attends to).

Modules: ``part`` (geometry and shading of a good screw in its canonical frame), ``defects`` (the five defect
types), ``scene`` (background, shadow, placing the part, noise), ``render`` (``render_screw``: the steps in order),
``dataset`` (``write_dataset``, ``contact_sheet``), ``raster`` (lookup-table and noise helpers). The names below
are the package's interface; the modules' other names are its internals.
"""

from tools.synth.dataset import contact_sheet, image_seed, write_dataset
from tools.synth.defects import DEFECT_TYPES
from tools.synth.render import render_screw

__all__ = ["DEFECT_TYPES", "contact_sheet", "image_seed", "render_screw", "write_dataset"]

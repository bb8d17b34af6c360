"""inspectd: the product's one command line (``inspectd.cli``). The parts live beside this package:

- ``daemon/``: the serving core (sources → preprocess → batch + infer → decide → sinks); never imports
  torch, training, replay or the tools.
- ``engine/``: preprocessing, pose and gauges, the model package, datasets and splits, backends.
- ``training/``: training, evaluation, calibration, export (the ``train`` extra).
- ``replay/``: a labelled folder through the real daemon, its report and comparison.
- ``tools/``: clients of the daemon's wire contract: the demo, its live view, the simulated camera, the
  verdict watcher, synthetic screws.
- ``bench/``: ``inspectd bench``.
"""

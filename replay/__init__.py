"""Replay: a labelled folder through the daemon's own pipeline, its report and the comparison of two runs.

A client of the daemon (it builds the real :class:`~daemon.app.App` and subscribes to its verdicts); the
daemon never imports it. Ground truth comes from :mod:`engine.dataset` and :mod:`engine.split` (torch-free).
"""


class ReplayError(ValueError):
    """The replay cannot run as asked (data, split, model); the message says what to fix."""

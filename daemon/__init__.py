"""inspectd daemon: the serving core — sources, preprocessing pool, micro-batcher, inference workers,
fail-safe decisions, verdict publisher, audit archive, metrics, logging, settings, and its own verbs
(``serve``, ``check-config``, ``keys``).

Runs on numpy + OpenCV + ONNX Runtime + pyzmq alone. It never imports torch, training, replay, the tools or
the bench (import contracts in ``make lint``; ``tests/unit/test_daemon_imports.py`` for lazy imports): those
are its clients.
"""

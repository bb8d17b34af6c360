"""inspectd daemon: sources, batching, fail-safe decisions, verdict publishing, metrics, CLI.

Runs on numpy + OpenCV + ONNX Runtime + pyzmq alone: the serving path never imports torch or the training
package. Only the QA commands do: ``replay`` reads ground truth with training's torch-free dataset modules, and
``demo`` runs ``inspectd train``/``export`` in subprocesses.
"""

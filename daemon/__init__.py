"""inspectd daemon: sources, batching, fail-safe decisions, verdict publishing, metrics, CLI.

Runs on numpy + OpenCV + ONNX Runtime + pyzmq alone: never imports torch or the training package.
"""

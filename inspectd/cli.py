"""``inspectd`` — the product's verb table: it parses the verb and dispatches, nothing else.

Each verb lives with the part it belongs to (``daemon.commands``, ``tools.commands``, ``replay.command``,
``plc.command``, ``training.commands``, ``engine.commands``, ``bench.command``) and provides
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen verb's module is imported, so ``inspectd serve`` never imports training
code or torch, and ``inspectd --help`` starts instantly.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name → (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("daemon.commands.serve", "run the inspection daemon"),
    "check-config": ("daemon.commands.check_config", "validate the configuration and print it"),
    "model": (
        "daemon.commands.model",
        "change a running daemon's model: load, shadow, promote, roll back (no restart)",
    ),
    "camera": ("tools.commands.camera", "simulated camera: push frames to the daemon"),
    "watch": ("tools.commands.watch", "print verdicts live and report gaps"),
    "plc-bridge": (
        "plc.command",
        "serve verdicts to PLCs over OPC UA and Modbus TCP, with a result handshake",
    ),
    "keys": ("daemon.commands.keys", "generate CURVE key pairs for the daemon, cameras and subscribers"),
    "replay": (
        "replay.command",
        "replay a labelled folder through the daemon's pipeline: report, compare, CI gates",
    ),
    "demo": ("tools.commands.demo", "synth → train → export → serve → simulated camera, with a live view"),
    "synth": ("tools.commands.synth", "generate labelled synthetic screw images"),
    "train": (
        "training.commands.train",
        "train the screw model (patch memory, or a ResNet18) into a run directory",
    ),
    "evaluate": ("training.commands.evaluate", "evaluate a run or model package: report.html + metrics.json"),
    "export": (
        "training.commands.export",
        "export a run as a verified model package (model.onnx + model.json)",
    ),
    "build-engine": (
        "engine.commands.build_engine",
        "build + parity-gate the TensorRT engine for this station",
    ),
    "check-backends": (
        "engine.commands.check_backends",
        "compare every available backend on the same images",
    ),
    "quantize": (
        "engine.commands.quantize",
        "INT8-quantise a model package for the CPU (refused on verdict flips)",
    ),
    "calibrate-gauges": (
        "training.commands.calibrate_gauges",
        "learn tolerance bands on pose measurements from OK images into model.json",
    ),
    "bench": ("bench.command", "measure the daemon against the machine's limit and the naive loop"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inspectd",
        description="Streaming visual inspection of screws: one fail-safe PASS/REJECT verdict per frame.",
        epilog="Run 'inspectd COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or args_in[0] not in COMMANDS:
        top = _top_parser()
        if not args_in:
            top.print_help()
            return 2
        top.parse_args(args_in)  # prints usage / --help and exits
        return 2
    name = args_in[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"inspectd {name}", description=module.__doc__ or help_text)
    module.add_arguments(parser)
    args = parser.parse_args(args_in[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

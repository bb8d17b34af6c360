"""``inspectd`` — one console script, one subcommand per module.

Only the chosen subcommand's module is imported, so ``inspectd serve`` never imports training code or
torch, and ``inspectd --help`` starts instantly. Each command module provides ``add_arguments(parser)`` and
``run(args) -> int``; its docstring's first line is its help.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name → (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("engine.commands.synth", "generate labelled synthetic screw images"),
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

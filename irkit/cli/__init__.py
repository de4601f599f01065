"""`irkit` command line: a thin layer over the library functions.

Each sub-command lives in its own module under ``irkit/cli/commands/`` and defines
``register(subparsers)``, which adds its parser and sets ``func=run`` where ``run(args) -> int``.
Commands are discovered, so adding one is adding one file. Every command module is imported to
build the parser, so a command imports the library it runs inside ``run`` (lazily): `irkit --help`
and argument errors then answer without loading torch, faiss or the web stack.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Sequence

from irkit.errors import IrkitError

#: commands whose arguments are CVNet-style ``KEY VALUE`` pairs, parsed by the command itself
RAW_ARGUMENT_COMMANDS = {"test"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="irkit", description="Instance-level image retrieval toolkit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from irkit.cli import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"irkit.cli.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in RAW_ARGUMENT_COMMANDS:
        args, rest = parser.parse_known_args(argv)
        args.overrides = rest
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except IrkitError as err:
        print(f"irkit {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"irkit {args.command}: interrupted (work written so far is kept; re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

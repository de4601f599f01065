"""``python -m irkit.train RECIPE [overrides…] [--resume]``; the entry point torchrun launches:
``torchrun --nproc-per-node N -m irkit.train RECIPE …`` (DDP: gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import argparse
import logging
import sys

from irkit.cli.commands.train import add_arguments, run
from irkit.errors import IrkitError
from irkit.train import distributed as D


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m irkit.train", description="Train an irkit model.")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level if D.local_rank() == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except IrkitError as err:
        print(f"irkit train: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

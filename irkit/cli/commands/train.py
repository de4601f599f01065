"""`irkit train RECIPE [key=value | KEY VALUE ...] [--resume] [--config FILE]`: train a retrieval model.

Recipes are the registry of :mod:`irkit.train.recipes` (their defaults in
``irkit/configs/<recipe>.yaml``); overrides use the dotted field names of
:class:`irkit.train.trainer.TrainConfig` (case-insensitive, e.g. ``optim.lr=1e-4`` or
``OPTIM.LR 1e-4``). Under ``torchrun`` the same command runs DDP (``python -m irkit.train``).
Every run writes ``metrics.csv``, ``eval.csv`` and ``learning_curve.png`` next to its checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys

from irkit.config import to_dict
from irkit.errors import ConfigError
from irkit.train.registry import get_recipe, recipe_names
from irkit.train.trainer import make_config, train

_FLAGS = {"--resume": 0, "--config": 1, "--print-config": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="; ".join(f"{n}: {get_recipe(n).summary}" for n in recipe_names()))
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="config overrides: key=value or KEY VALUE (e.g. steps=100 data.batch_size=8 "
                        "OPTIM.LR 1e-4); --resume / --config FILE may also appear among them")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last checkpoint")
    p.add_argument("--config", help="YAML file merged over the recipe defaults (before the overrides)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=f"train a model (recipes: {', '.join(recipe_names())})",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def split_flags(args: argparse.Namespace) -> argparse.Namespace:
    """Move ``--resume`` / ``--config X`` / ``--print-config`` found among the overrides onto args."""
    rest, tokens, i = [], list(args.overrides or []), 0
    while i < len(tokens):
        tok = tokens[i]
        name, _, inline = tok.partition("=")
        if name in _FLAGS:
            if _FLAGS[name]:
                if inline:
                    value = inline
                elif i + 1 < len(tokens):
                    value = tokens[i + 1]
                    i += 1
                else:
                    raise ConfigError(f"{name} needs a value")
                setattr(args, name[2:].replace("-", "_"), value)
            else:
                setattr(args, name[2:].replace("-", "_"), True)
        elif tok.startswith("--"):
            raise ConfigError(f"unknown option {tok!r}; config values are given as key=value (see --help)")
        else:
            rest.append(tok)
        i += 1
    args.overrides = rest
    return args


def run(args: argparse.Namespace) -> int:
    args = split_flags(args)
    if args.print_config:
        print(json.dumps(to_dict(make_config(args.recipe, args.overrides, args.config)), indent=2))
        return 0
    summary = train(args.recipe, args.overrides, resume=args.resume, config_file=args.config)
    print(json.dumps(summary, indent=2, default=str))
    files = summary.get("files") or {}
    for what in ("model", "metrics", "eval", "learning_curve"):
        if files.get(what):
            print(f"{what.replace('_', ' ')}: {files[what]}", file=sys.stderr)
    return 0

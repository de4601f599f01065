"""`irkit models`: list the model presets."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model presets", description="List the registered model presets.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from irkit.models.registry import get_preset, list_presets

    for name in list_presets():
        print(f"{name:20s} {get_preset(name).description}")
    return 0

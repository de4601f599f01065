"""`irkit test MODEL.DEPTH 50 TEST.WEIGHTS ckpt.pyth TEST.DATA_DIR dir …`: the published CVNet test
command form (yacs ``KEY VALUE`` pairs, or ``key=value``), printing the E/M/H tables per dataset."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from irkit.config import CVNET_TEST_ALIASES, apply_overrides
from irkit.errors import ConfigError


@dataclass
class TestModel:
    depth: int = 50
    reduction_dim: int = 2048


@dataclass
class CVNetTestConfig:
    """The keys of CVNet's test config that irkit honours (yacs names: see CVNET_TEST_ALIASES)."""

    model: TestModel = field(default_factory=TestModel)
    weights: str | None = None
    data_dir: str | None = None
    datasets: list[str] = field(default_factory=lambda: ["roxford5k", "rparis6k"])
    scales: list[float] = field(default_factory=lambda: [0.7071, 1.0, 1.4142])
    topk: list[int] = field(default_factory=lambda: [100])


def parse_overrides(tokens: list[str]) -> CVNetTestConfig:
    """``["MODEL.DEPTH", "50", "TEST.WEIGHTS=x.pyth"]`` -> config; unknown keys are refused."""
    cfg = apply_overrides(CVNetTestConfig(), tokens, CVNET_TEST_ALIASES)
    if cfg.model.depth not in (50, 101):
        raise ConfigError(f"MODEL.DEPTH must be 50 or 101, got {cfg.model.depth}")
    if cfg.model.reduction_dim != 2048:
        raise ConfigError("MODEL.HEADS.REDUCTION_DIM: the published CVNet models use 2048")
    if not cfg.data_dir:
        raise ConfigError("TEST.DATA_DIR is required (the folder holding roxford5k/, rparis6k/)")
    return cfg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("test", help="CVNet-style test: irkit test MODEL.DEPTH 50 TEST.WEIGHTS … TEST.DATA_DIR …",
                       description="Reproduce the published CVNet test: global and re-ranked E/M/H tables "
                       "for each dataset. Arguments are yacs-style KEY VALUE pairs.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", help="where feature stores are cached (default $IRKIT_CACHE or ~/.cache/irkit)")
    p.add_argument("--rerank-mode", choices=["protocol", "plain"], default="protocol",
                   help="candidate selection for re-ranking (protocol = as the published code)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from irkit.eval.revisitop import format_table
    from irkit.models.registry import build_model
    from irkit.pipeline import evaluate_dataset, rerank_results

    cfg = parse_overrides(getattr(args, "overrides", []))
    model = build_model(f"cvnet-r{cfg.model.depth}", weights=cfg.weights, device=args.device)
    for name in cfg.datasets:
        run_ = evaluate_dataset(cfg.data_dir, name, model, cfg.scales, cache_dir=args.cache_dir, with_maps=True)
        print(f">> {name}: global retrieval (scales {cfg.scales})")
        print(format_table(run_.results))
        for k in cfg.topk:
            results, _ = rerank_results(run_, model, k, mode=args.rerank_mode, method="cvnet")
            print(f">> {name}: re-ranked top {k} ({args.rerank_mode} candidates)")
            print(format_table(results))
    return 0

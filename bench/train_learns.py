"""Does training learn, for real? Two bounded CPU experiments whose numbers go in the report.

(a) ``scenes``: a small CNN from random initialisation, trained label-free on generated textured
    scenes (synthetic views: homography + photometric changes + occluders), evaluated on *held-out*
    scenes (other seed): for each scene one query view and two database views; mAP over all
    queries (revisitop AP; positives = the scene's two views). Reported against the same net
    before training and against random descriptors (chance).
(b) ``finetune``: EfficientNet-Lite0 from its real ImageNet weights (pip package), fine-tuned on
    synthetic pairs from the photos :mod:`irkit.data.photo_sources` finds (never minidev's images),
    minidev mAP Easy/Medium/Hard before and after, for each recipe given.

Usage::

    python bench/train_learns.py scenes   --out runs/bench_scenes --minutes 5
    python bench/train_learns.py finetune --out runs/bench_ft --recipes gem-contrastive,cvnet-global \
        --minutes 6 --eval-max-side 320

Results go to ``<out>/results.json`` and stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MINIDEV_DATA_DIR = ROOT.parent / "shared" / "assets" / "datasets"
log = logging.getLogger("train_learns")


# ------------------------------------------------------------------------------------ (a) scenes
def register_small_cnn() -> None:
    from irkit.errors import ConfigError
    from irkit.models.base import GlobalModel
    from irkit.models.registry import Preset, get_preset, register_preset
    from irkit.nn.pooling import GeM

    class SmallCNN(GlobalModel):
        """4 stride-2 conv stages (32-64-128-128) -> GeM -> FC 128 -> L2 (about 0.3M parameters)."""

        def __init__(self, dim: int = 128) -> None:
            super().__init__()
            layers, c_in = [], 3
            for c in (32, 64, 128, 128):
                layers += [nn.Conv2d(c_in, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU(),
                           nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU()]
                c_in = c
            self.backbone = nn.Sequential(*layers)
            self.pool = GeM()
            self.fc = nn.Linear(c_in, dim)
            self.dim = dim

        def forward(self, x):
            return F.normalize(self.fc(self.pool(self.backbone(x))), dim=-1)

    try:
        get_preset("bench-small-cnn")
    except ConfigError:
        register_preset(Preset("bench-small-cnn", lambda **kw: SmallCNN(**kw), "bench only: small random-init CNN"))


def heldout_set(folder: Path, n: int, size: int, seed: int):
    """Query views, database views and ground truth for ``n`` held-out generated scenes."""
    from irkit.data.synthetic_pairs import ViewConfig, random_view
    from irkit.data.training import synthetic_scenes
    from irkit.io.images import load_image

    import cv2

    cfg = ViewConfig(out_size=(size, size))
    queries, db, gnd = [], [], []
    for i, p in enumerate(synthetic_scenes(folder, n, size=256, seed=seed)):
        img = cv2.resize(load_image(p), (size, size), interpolation=cv2.INTER_AREA)
        queries.append(random_view(img, np.random.default_rng([seed, i, 0]), cfg).image)
        db.append(random_view(img, np.random.default_rng([seed, i, 1]), cfg).image)
        db.append(random_view(img, np.random.default_rng([seed, i, 2]), cfg).image)
        gnd.append({"easy": [2 * i, 2 * i + 1], "hard": [], "junk": [], "bbx": None})
    return queries, db, gnd


def heldout_map(model, queries, db, gnd) -> float:
    from irkit.eval.revisitop import evaluate_ranks, ranks_from_scores
    from irkit.extract import embed_arrays

    was = model.training
    model.eval()
    q = embed_arrays(model, queries, [1.0])
    x = embed_arrays(model, db, [1.0])
    model.train(was)
    return float(evaluate_ranks(ranks_from_scores(x @ q.T), gnd)["easy"]["map"])


def run_scenes(args) -> dict:
    from irkit.train.trainer import Trainer, make_config

    register_small_cnn()
    out = Path(args.out)
    size = args.image_size
    queries, db, gnd = heldout_set(out / "heldout_scenes", args.heldout, size, seed=1)
    overrides = [
        "model.preset=bench-small-cnn", "model.pretrained=false", "model.bn=train",
        "data.kind=scenes", f"data.path={out / 'train_scenes'}", f"data.num_scenes={args.scenes}",
        f"data.image_size={size}", "data.batch_size=32", "data.per_class=2", "data.workers=0",
        "optim.name=adamw", "optim.lr=2e-3", "optim.weight_decay=1e-4", "optim.head_lr_mult=1",
        "schedule.kind=cosine", "schedule.warmup_steps=20", f"steps={args.steps}",
        f"max_minutes={args.minutes}", "ckpt_every=100000", "log_every=20", "progress=false",
        f"out_dir={out / args.recipe}", "loss.queue_size=1024", "loss.stage2_step=-1",
    ] + list(args.override)
    cfg = make_config(args.recipe, overrides)
    trainer = Trainer(cfg)
    rand_map = heldout_map(trainer.recipe.export(), queries, db, gnd)
    summary = trainer.fit(resume=(out / args.recipe / "latest.json").is_file())
    trained_map = heldout_map(trainer.recipe.export(), queries, db, gnd)
    return {"experiment": "scenes", "recipe": args.recipe, "train_scenes": args.scenes,
            "heldout_scenes": args.heldout, "image_size": size, "steps": summary["step"],
            "train_seconds": summary["seconds"], "final_loss": summary["loss"],
            "heldout_map_random_init": rand_map, "heldout_map_trained": trained_map,
            "heldout_map_random_features": random_features_map(db, gnd, len(queries))}


def random_features_map(db, gnd, n_queries: int, dim: int = 128, seed: int = 0) -> float:
    """Chance level: the same protocol with random descriptors."""
    from irkit.eval.revisitop import evaluate_ranks, ranks_from_scores

    g = np.random.default_rng(seed)
    q = g.standard_normal((n_queries, dim)).astype(np.float32)
    x = g.standard_normal((len(db), dim)).astype(np.float32)
    return float(evaluate_ranks(ranks_from_scores(x @ q.T), gnd)["easy"]["map"])


# ---------------------------------------------------------------------------------- (b) finetune
def run_finetune(args) -> dict:
    from irkit.data.photo_sources import locate_photo_pool
    from irkit.models.registry import build_model
    from irkit.train.trainer import Trainer, evaluate_revisitop, make_config

    out = Path(args.out)
    data_dir = Path(args.data_dir)
    photos = locate_photo_pool("auto")
    log.info("training photos (%d): %s", len(photos), ", ".join(p.name for p in photos))
    cache: dict = {}
    t = time.time()
    before = evaluate_revisitop(build_model(args.preset), data_dir, "minidev", [1.0], args.eval_max_side, cache)
    before.pop("_cache")
    results = {"experiment": "finetune", "preset": args.preset, "photos": [str(p) for p in photos],
               "eval_max_side": args.eval_max_side, "before": before,
               "before_eval_seconds": round(time.time() - t, 1), "recipes": {}}
    for recipe in args.recipes.split(","):
        overrides = [
            f"model.preset={args.preset}", "model.bn=frozen", "data.kind=synthetic",
            f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}", "data.per_class=2",
            "data.workers=0", "optim.name=adamw", f"optim.lr={args.lr}", "optim.weight_decay=1e-4",
            "optim.head_lr_mult=50", "schedule.kind=cosine", "schedule.warmup_steps=5",
            f"steps={args.steps}", f"max_minutes={args.minutes}", "ckpt_every=100000", "log_every=5",
            "progress=false", f"out_dir={out / recipe}", "loss.queue_size=256", "loss.stage2_step=-1",
        ] + list(args.override)
        cfg = make_config(recipe, overrides)
        trainer = Trainer(cfg)
        summary = trainer.fit(resume=(out / recipe / "latest.json").is_file())
        t = time.time()
        after = evaluate_revisitop(trainer.recipe.export(), data_dir, "minidev", [1.0], args.eval_max_side, cache)
        after.pop("_cache")
        results["recipes"][recipe] = {"after": after, "steps": summary["step"], "train_seconds": summary["seconds"],
                                      "final_loss": summary["loss"], "eval_seconds": round(time.time() - t, 1)}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["scenes", "finetune"])
    p.add_argument("--out", default="runs/bench_train")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-time bound per run")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--override", action="append", default=[], help="extra key=value config overrides")
    # scenes
    p.add_argument("--recipe", default="gem-contrastive")
    p.add_argument("--scenes", type=int, default=256)
    p.add_argument("--heldout", type=int, default=40)
    p.add_argument("--image-size", type=int, default=96)
    # finetune
    p.add_argument("--preset", default="effnetlite0-gem")
    p.add_argument("--recipes", default="gem-contrastive,cvnet-global")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-max-side", type=int, default=320)
    p.add_argument("--data-dir", default=str(MINIDEV_DATA_DIR))
    args = p.parse_args(argv)
    if args.experiment == "finetune" and args.image_size == 96:
        args.image_size = 160
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res = run_scenes(args) if args.experiment == "scenes" else run_finetune(args)
    (Path(args.out) / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

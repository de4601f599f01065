"""Does training learn, for real? Two bounded CPU experiments whose numbers go in the report.

(a) ``scenes``: a small CNN from random initialisation, trained label-free on generated textured
    scenes (synthetic views: homography + photometric changes + occluders), evaluated on *held-out*
    scenes (other seed): for each scene one query view and two database views; mAP over all
    queries (revisitop AP; positives = the scene's two views). Reported against the same net
    before training and against random descriptors (chance).
(b) ``finetune``: EfficientNet-Lite0 from its real ImageNet weights (pip package), fine-tuned on
    synthetic pairs from the photos :mod:`irkit.data.photo_sources` finds (never minidev's images),
    minidev mAP Easy/Medium/Hard before and after, for each recipe given.

(c) ``real``: what learning from the real multi-view pool (``../shared/assets/train/real-multiview``:
    385 photos, 26 classes, none in minidev) does to minidev at the default test setting
    (effnetlite2-gem, real ImageNet weights, larger side 448, scales 0.7071/1/1.4142):
    whitening (PCA-w and Lw learned on the pool), the CVNet re-ranker (``cvnet-rerank``, λ and
    top-k chosen on held-out classes) and global fine-tuning (``--recipes``), each over ``--seeds``
    with ``--minutes`` per run; every choice (checkpoint, λ, top-k, whitening variant) is made on
    held-out classes of the pool, never on minidev. Stages are cached under ``--out`` (a finished
    stage is reused; delete its folder to redo it).

Usage::

    python bench/train_learns.py scenes   --out runs/bench_scenes --minutes 5
    python bench/train_learns.py finetune --out runs/bench_ft --recipes gem-contrastive,cvnet-global \
        --minutes 6 --eval-max-side 320
    python bench/train_learns.py real --out runs/bench_real --minutes 30 --seeds 0,1,2   # the full protocol
    python bench/train_learns.py real --out runs/real --seeds 0,1,2 --minutes 15 --rerank-minutes 8 \
        --lr 5e-5 --rerank-topks 10,25                                                   # the README table

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
REAL_POOL = ROOT.parent / "shared" / "assets" / "train" / "real-multiview"
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
    return float(evaluate_ranks(ranks_from_scores(x @ q.T), gnd, protocols=("easy",))["easy"]["map"])


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
    return float(evaluate_ranks(ranks_from_scores(x @ q.T), gnd, protocols=("easy",))["easy"]["map"])


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


# -------------------------------------------------------------------------------------- (c) real
PRESET = "effnetlite2-gem"
WHITENING_VARIANTS = [  # (name, method, dims, shrinkage); 1280 = full dimension (needs shrinkage: N < D)
    ("pca-1280", "pca", None, 0.1), ("pca-256", "pca", 256, 0.1),
    ("lw-1280", "lw", None, 0.1), ("lw-256", "lw", 256, 0.1),
]


def load_report() -> dict:
    """Load average against the cores, with a warning when the machine is busy."""
    import os

    la = os.getloadavg()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = la[0] > 0.75 * cores
    rep = {"loadavg_1_5_15": [round(v, 2) for v in la], "cores": cores, "busy": busy}
    if busy:
        log.warning("MACHINE BUSY: load %.1f on %d cores; wall times (and minutes-bounded training) are "
                    "not quiet-machine figures", la[0], cores)
    return rep


def emh(res: dict) -> dict:
    return {p: round(float(res[p]["map"] if isinstance(res[p], dict) else res[p]), 2)
            for p in ("easy", "medium", "hard")}


def mean_spread(rows: list[dict]) -> dict:
    out = {}
    for p in ("easy", "medium", "hard"):
        v = np.array([r[p] for r in rows], dtype=float)
        out[p] = {"mean": round(float(v.mean()), 2), "min": round(float(v.min()), 2), "max": round(float(v.max()), 2),
                  "std": round(float(v.std()), 2)}
    return out


def val_classes_for_seed(class_names: list[str], counts: dict, seed: int) -> list[str]:
    """Held-out classes of one seed, one of each kind so validation sees landmarks, scenes and
    objects: a Paris landmark (>= 10 photos), an SfM scene (>= 7 views), two UKBench objects."""
    rng = np.random.default_rng([seed, 2024])
    groups = [([c for c in class_names if c.startswith("paris_") and counts.get(c, 0) >= 10], 1),
              ([c for c in class_names if c.startswith("sfm_") and counts.get(c, 0) >= 7], 1),
              ([c for c in class_names if c.startswith("ukbench_")], 2)]
    out = []
    for names, n in groups:
        if names:
            out += sorted(rng.choice(names, size=min(n, len(names)), replace=False).tolist())
    if not out:  # another pool: three classes drawn by the seed
        out = sorted(rng.choice(class_names, size=min(3, len(class_names) - 2), replace=False).tolist())
    return out


def _cached(path: Path, fn):
    if path.is_file():
        log.info("reusing %s", path)
        return json.loads(path.read_text())
    res = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    return res


def _fit_once(trainer, folder: Path) -> dict:
    """Train once: a finished run (``summary.json``) is not trained again (resuming a run that
    stopped at ``max_minutes`` would train for another budget)."""
    path = folder / "summary.json"
    if path.is_file():
        return json.loads(path.read_text())
    summary = trainer.fit(resume=(folder / "latest.json").is_file())
    path.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def minidev_global(args, model, with_maps=False):
    from irkit.pipeline import evaluate_dataset

    return evaluate_dataset(args.data_dir, "minidev", model, None, cache_dir=args.cache_dir, with_maps=with_maps,
                            progress=False)


def pool_descriptors(args):
    """Descriptors of every pool image at the default test setting (cached feature store)."""
    from irkit.data.labelled import folder_per_class
    from irkit.extract import Item, extract_to_store
    from irkit.models.registry import build_model

    pool = folder_per_class(args.pool)
    ids = [f"{pool.class_names[c]}/{i}" for i, c in zip(pool.ids, pool.labels.tolist())]
    store = extract_to_store(build_model(PRESET), [Item(i, str(p)) for i, p in zip(ids, pool.paths)],
                             Path(args.out) / "pool_store", dtype="float32", progress=False)
    desc = np.asarray(store.descriptors(), dtype=np.float32)
    keep = [k for k, i in enumerate(ids) if i in store]
    x = np.stack([desc[store.index_of(ids[k])] for k in keep])
    return x, pool.labels[keep], [pool.class_names[c] for c in range(pool.num_classes)]


def pool_val_map(x, labels, held: np.ndarray, method, dims, shrinkage) -> float:
    """mAP of the held-out classes' images querying each other, the whitening learned on the rest."""
    import torch as T

    from irkit.nn.whitening import learn_whitening
    from irkit.train.select import labelled_map

    tr, va = ~held, held
    y = x[va]
    if method != "none":
        w = learn_whitening(T.from_numpy(x[tr]), labels[tr], method, dims=dims, shrinkage=shrinkage)
        y = w.apply(T.from_numpy(y)).numpy()
    return labelled_map(y, labels[va], int(va.sum()))


def stage_whitening(args, base_run, seeds) -> dict:
    import torch as T

    from irkit.models.registry import build_model
    from irkit.nn.whitening import learn_whitening, save_whitening
    from irkit.pipeline import global_search
    from irkit.eval.revisitop import evaluate_ranks

    out = Path(args.out) / "whitening"
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    x, labels, names = pool_descriptors(args)
    counts = {n: int((labels == i).sum()) for i, n in enumerate(names)}
    res = {"pool_images": int(len(x)), "pool_classes": len(names), "pool_extract_seconds": round(time.time() - t, 1),
           "variants": {}}
    q, db = T.from_numpy(base_run.queries), T.from_numpy(base_run.database)
    for name, method, dims, shrink in WHITENING_VARIANTS:
        w = learn_whitening(T.from_numpy(x), labels, method, dims=dims, shrinkage=shrink)
        save_whitening(w, out / f"{name}.safetensors")
        _, ranks = global_search(w.apply(q).numpy(), w.apply(db).numpy())
        # choosing the variant: held-out classes of the pool (one split per seed), never minidev
        val = []
        for s in seeds:
            held = np.isin(np.array(names)[labels], val_classes_for_seed(names, counts, s))
            val.append({"seed": s, "none": pool_val_map(x, labels, held, "none", None, 0),
                        "whitened": pool_val_map(x, labels, held, method, dims, shrink)})
        res["variants"][name] = {"method": method, "dims": dims or int(x.shape[1]), "shrinkage": shrink,
                                 "minidev_post_scale_average": emh(evaluate_ranks(ranks, base_run.dataset.gnd)),
                                 "pool_val": val,
                                 "pool_val_gain": round(float(np.mean([v["whitened"] - v["none"] for v in val])), 2)}
        log.info("whitening %s: minidev %s, pool-val gain %+.2f", name, res["variants"][name]["minidev_post_scale_average"],
                 res["variants"][name]["pool_val_gain"])
    # spread: the Lw of each seed learned without that seed's held-out classes (other pool subsets)
    res["lw_subsets"] = {}
    for s in seeds:
        keep = ~np.isin(np.array(names)[labels], val_classes_for_seed(names, counts, s))
        w = learn_whitening(T.from_numpy(x[keep]), labels[keep], "lw", shrinkage=0.1)
        _, ranks = global_search(w.apply(q).numpy(), w.apply(db).numpy())
        res["lw_subsets"][str(s)] = emh(evaluate_ranks(ranks, base_run.dataset.gnd))
    res["lw_subsets_mean"] = mean_spread(list(res["lw_subsets"].values()))
    chosen = max(res["variants"], key=lambda n: res["variants"][n]["pool_val_gain"])
    res["chosen_on_pool_val"] = chosen
    # the preset path: whitening applied per scale inside the model (what `irkit whiten` + -lw does)
    lw_model = build_model(f"{PRESET}-lw", weights=out / f"{chosen}.safetensors")
    res["preset"] = {"model": f"{PRESET}-lw", "weights": str(out / f"{chosen}.safetensors"),
                     "minidev": emh(minidev_global(args, lw_model).results)}
    return res


def stage_rerank(args, base_run, seeds) -> dict:
    """Per seed: train on the pool (held-out classes for early stopping on validation AUC), choose λ
    and top-k on the held-out classes, then re-rank minidev (global descriptors of effnetlite2-gem,
    maps at scale 1) with the chosen λ / top-k, and, for reference, λ 0.5 / top 100."""
    from irkit.data.labelled import folder_per_class
    from irkit.models.registry import build_model
    from irkit.pipeline import rerank_results
    from irkit.train.recipes_rerank import select_on_bank
    from irkit.train.select import save_rerank_choice
    from irkit.train.trainer import Trainer, make_config

    out = Path(args.out) / "rerank"
    pool = folder_per_class(args.pool)
    counts = {n: int((pool.labels == i).sum()) for i, n in enumerate(pool.class_names)}
    h, w = (int(v) for v in args.rerank_view.split(","))
    trained = {}
    for seed in seeds:
        def train_one(seed=seed):
            folder = out / f"seed{seed}"
            val = val_classes_for_seed(pool.class_names, counts, seed)
            overrides = [f"out_dir={folder}", "model.preset=effnetlite2-cvnet", "data.kind=folder",
                         f"data.path={args.pool}", f"data.val_class_names=[{','.join(val)}]",
                         f"data.views.size=[{h},{w}]", f"data.cache_dir={out}", f"seed={seed}",
                         f"eval.rerank_topks=[{args.rerank_topks}]",
                         f"steps={args.steps}", f"max_minutes={args.rerank_minutes or args.minutes}", "eval.every=50",
                         "eval.patience=6",
                         "ckpt_every=100", "log_every=10", "progress=false"] + list(args.override)
            trainer = Trainer(make_config("cvnet-rerank", overrides))
            summary = _fit_once(trainer, folder)
            if trainer.recipe.bank is None:
                trainer.recipe.setup(trainer)
            best = folder / "best.safetensors"
            ckpt = best if best.is_file() else folder / "model.safetensors"
            model = build_model("effnetlite2-cvnet", weights=ckpt)
            t = time.time()
            topks = [int(k) for k in args.rerank_topks.split(",")]
            if (folder / "rerank.json").is_file() and json.loads((folder / "rerank.json").read_text()).get(
                    "topks") == topks:                      # written at the end of training with these top-k
                choice = json.loads((folder / "rerank.json").read_text())
            else:
                choice = select_on_bank(model.reranker, trainer.recipe.bank, topks=topks, max_queries=40, seed=seed,
                                        min_gain=args.rerank_min_gain)
                save_rerank_choice(choice, folder, checkpoint=str(ckpt), val_classes=val)
            return {"val_classes": val, "checkpoint": str(ckpt), "steps": summary["step"],
                    "train_seconds": summary["seconds"], "setup_seconds": summary.get("setup_seconds"),
                    "best": summary.get("best"), "stopped_early": summary["stopped_early"],
                    "lambda": choice["lambda"], "topk": choice["topk"], "val_map_global": choice["val_map_global"],
                    "val_map_reranked": choice["val_map"], "min_gain": choice.get("min_gain", 0.0),
                    "best_lambda": choice.get("best_lambda", choice["lambda"]),
                    "best_topk": choice.get("best_topk", choice["topk"]),
                    "best_val_map": choice.get("best_val_map", choice["val_map"]),
                    "select_seconds": round(time.time() - t, 1),
                    "load": load_report()}
        trained[seed] = _cached(out / f"seed{seed}" / "train_result.json", train_one)
    run = minidev_global(args, build_model("effnetlite2-cvnet"), with_maps=True)   # same descriptors as -gem
    res = {"global": emh(run.results), "seeds": {}}
    for seed in seeds:
        def eval_one(seed=seed):
            tr = trained[seed]
            model = build_model("effnetlite2-cvnet", weights=tr["checkpoint"])
            t = time.time()
            if tr["lambda"] > 0:
                after = emh(rerank_results(run, model, k=tr["topk"], lam=tr["lambda"], progress=False)[0])
            else:
                after = emh(run.results)   # λ = 0: the global ranking, unchanged
            out_row = {**tr, "minidev_reranked": after, "minidev_eval_seconds": round(time.time() - t, 1)}
            if tr.get("best_lambda", 0) > 0 and tr["best_lambda"] != tr["lambda"]:
                # what the unguarded validation optimum (no min-gain) does on minidev, for the record
                out_row["minidev_reranked_unguarded"] = emh(rerank_results(
                    run, model, k=tr["best_topk"], lam=tr["best_lambda"], progress=False)[0])
            if args.rerank_reference:       # the untuned default, for comparison (costs another re-ranking)
                out_row["minidev_lambda0.5_top100"] = emh(rerank_results(run, model, k=100, lam=0.5,
                                                                         progress=False)[0])
            return out_row
        res["seeds"][str(seed)] = _cached(out / f"seed{seed}" / "result.json", eval_one)
    res["mean"] = mean_spread([r["minidev_reranked"] for r in res["seeds"].values()])
    res["mean_unguarded"] = mean_spread([r.get("minidev_reranked_unguarded", r["minidev_reranked"])
                                         for r in res["seeds"].values()])
    if all("minidev_lambda0.5_top100" in r for r in res["seeds"].values()):
        res["mean_lambda0.5_top100"] = mean_spread([r["minidev_lambda0.5_top100"] for r in res["seeds"].values()])
    return res


def stage_finetune(args, base_run, seeds) -> dict:
    from irkit.data.labelled import folder_per_class
    from irkit.models.registry import build_model
    from irkit.train.trainer import Trainer, make_config

    out = Path(args.out) / "finetune"
    pool = folder_per_class(args.pool)
    counts = {n: int((pool.labels == i).sum()) for i, n in enumerate(pool.class_names)}
    res = {"before": emh(base_run.results), "recipes": {}}
    for recipe in args.recipes.split(","):
        rows = {}
        for seed in seeds:
            def one(seed=seed, recipe=recipe):
                folder = out / recipe / f"seed{seed}"
                val = val_classes_for_seed(pool.class_names, counts, seed)
                overrides = [
                    f"out_dir={folder}", f"model.preset={PRESET}", "model.bn=frozen", "data.kind=folder",
                    f"data.path={args.pool}", f"data.val_class_names=[{','.join(val)}]",
                    f"data.image_size={args.train_size}", f"data.batch_size={args.batch_size}", "data.per_class=2",
                    "data.workers=0", "optim.name=adamw", f"optim.lr={args.lr}", "optim.weight_decay=1e-4",
                    "optim.head_lr_mult=50", "schedule.kind=cosine", "schedule.warmup_steps=5", f"seed={seed}",
                    f"steps={args.steps}", f"max_minutes={args.minutes}", "ckpt_every=100000", "log_every=5",
                    "eval.every=60", "eval.at_start=true", "eval.patience=5", "progress=false",
                    "data.val_distractors=128", "data.val_max_side=288",
                    "loss.queue_size=256", "loss.stage2_step=-1",
                ] + list(args.override)
                trainer = Trainer(make_config(recipe, overrides))
                summary = _fit_once(trainer, folder)
                best = summary.get("best") or {}
                t = time.time()
                if best.get("step", 0) == 0:
                    after = emh(base_run.results)       # validation kept the starting weights
                else:
                    after = emh(minidev_global(args, build_model(PRESET, weights=folder / "best.safetensors")).results)
                return {"val_classes": val, "steps": summary["step"], "train_seconds": summary["seconds"],
                        "best": best, "stopped_early": summary["stopped_early"], "minidev": after,
                        "minidev_eval_seconds": round(time.time() - t, 1), "load": load_report()}
            rows[str(seed)] = _cached(out / recipe / f"seed{seed}" / "result.json", one)
        res["recipes"][recipe] = {"seeds": rows, "mean": mean_spread([r["minidev"] for r in rows.values()])}
    return res


def run_real(args) -> dict:
    from irkit.models.registry import build_model

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    stages = set(args.stages.split(","))
    t0 = time.time()
    res = {"experiment": "real", "pool": args.pool, "model": PRESET, "test_setting": "max side 448, scales "
           "0.7071/1/1.4142", "seeds": seeds, "minutes_per_run": args.minutes,
           "rerank_minutes_per_run": args.rerank_minutes or args.minutes, "load_start": load_report()}
    base_run = minidev_global(args, build_model(PRESET))
    res["off_the_shelf"] = emh(base_run.results)
    print(f"off-the-shelf {PRESET} minidev E/M/H: {res['off_the_shelf']}", flush=True)
    if "whitening" in stages:
        res["whitening"] = _cached(Path(args.out) / "whitening" / "result.json",
                                   lambda: stage_whitening(args, base_run, seeds))
    if "rerank" in stages:
        res["rerank"] = stage_rerank(args, base_run, seeds)
    if "finetune" in stages:
        res["finetune"] = stage_finetune(args, base_run, seeds)
    res["load_end"] = load_report()
    res["wall_minutes"] = round((time.time() - t0) / 60, 1)
    print_real_table(res)
    return res


def print_real_table(res: dict) -> None:
    def f(d):
        return f"{d['easy']:.2f} / {d['medium']:.2f} / {d['hard']:.2f}"

    print(f"\nminidev E/M/H (%), {res['model']}, {res['test_setting']}; seeds {res['seeds']}, "
          f"{res['minutes_per_run']} min per run; load {res['load_start']['loadavg_1_5_15']} on "
          f"{res['load_start']['cores']} cores{' (BUSY)' if res['load_start']['busy'] else ''}")
    print(f"{'off-the-shelf':40s} {f(res['off_the_shelf'])}")
    for name, v in res.get("whitening", {}).get("variants", {}).items():
        print(f"{'whitening ' + name + ' (after scale avg)':40s} {f(v['minidev_post_scale_average'])}"
              f"   pool-val gain {v['pool_val_gain']:+.2f}")
    if "whitening" in res:
        w = res["whitening"]
        for sd, v in w.get("lw_subsets", {}).items():
            print(f"{'lw-1280 without seed ' + sd + ' val classes':40s} {f(v)}")
        print(f"{'preset -lw (' + w['chosen_on_pool_val'] + ', per scale)':40s} {f(w['preset']['minidev'])}")
    if "rerank" in res:
        r = res["rerank"]
        print(f"{'global only (re-ranker rows)':40s} {f(r['global'])}")
        for s, v in r["seeds"].items():
            print(f"{'cvnet-rerank seed ' + s:40s} {f(v['minidev_reranked'])}   λ {v['lambda']} top-{v['topk']}, "
                  f"val mAP {v['val_map_global']:.2f} -> {v['val_map_reranked']:.2f}"
                  + (f"; λ0.5/top100: {f(v['minidev_lambda0.5_top100'])}" if "minidev_lambda0.5_top100" in v else ""))
        for key, label in (("mean", "cvnet-rerank mean"), ("mean_unguarded", "cvnet-rerank mean, no min-gain")):
            m = r[key]
            print(f"{label:40s} {m['easy']['mean']:.2f} / {m['medium']['mean']:.2f} / {m['hard']['mean']:.2f}")
    for recipe, v in res.get("finetune", {}).get("recipes", {}).items():
        for s, row in v["seeds"].items():
            print(f"{recipe + ' seed ' + s:40s} {f(row['minidev'])}   best step {row['best'].get('step')} "
                  f"of {row['steps']}")
        m = v["mean"]
        print(f"{recipe + ' mean (min..max)':40s} " + " / ".join(
            f"{m[p]['mean']:.2f} ({m[p]['min']:.2f}..{m[p]['max']:.2f})" for p in ("easy", "medium", "hard")))



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["scenes", "finetune", "real"])
    p.add_argument("--out", default="runs/bench_train")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-time bound per run")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rerank-minutes", type=float, default=None, help="real: re-ranker budget (default --minutes)")
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
    # real
    p.add_argument("--pool", default=str(REAL_POOL), help="real: folder-per-class training pool")
    p.add_argument("--seeds", default="0,1,2", help="real: comma-separated seeds")
    p.add_argument("--stages", default="whitening,rerank,finetune", help="real: stages to run")
    p.add_argument("--train-size", type=int, default=224, help="real finetune: training image side")
    p.add_argument("--rerank-view", default="224,288", help="real rerank: view size h,w of the map bank")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--cache-dir", default=None, help="real: minidev feature-store cache (default: irkit's)")
    p.add_argument("--rerank-topks", default="10,25,50,100",
                   help="real rerank: top-k values the validation split chooses from (minidev re-ranking cost "
                        "grows with k: 37 queries x k pairs)")
    p.add_argument("--rerank-min-gain", type=float, default=0.5,
                   help="real rerank: λ stays 0 unless re-ranking gains this many validation mAP points")
    p.add_argument("--rerank-reference", action="store_true",
                   help="real rerank: also re-rank minidev with the untuned λ 0.5 / top 100")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.experiment == "finetune" and args.image_size == 96:
        args.image_size = 160
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.experiment == "real":
        res = run_real(args)
    else:
        res = run_scenes(args) if args.experiment == "scenes" else run_finetune(args)
    (Path(args.out) / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

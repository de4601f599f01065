"""Does held-out-class validation on a training pool predict minidev? Compares two checkpoints of
one preset (e.g. the ImageNet weights and a fine-tuned best.safetensors) three ways:

1. validation as the trainer computes it (held-out classes among training distractors, one scale);
2. the same at the test setting (larger side 448, the preset's scales, every training image a
   distractor), to tell a resolution mismatch from a data mismatch;
3. minidev mAP per query group (the name prefix: ``pt_`` phototourism landmarks, ``wxbs_`` wide
   baseline, ``ocv_``, ``lightglue_``), to see where a change comes from.

    python bench/transfer_check.py --after runs/real/finetune/cvnet-global/seed1/best.safetensors \\
        --val-classes paris_invalides,sfm_nle_tower,ukbench_004,ukbench_006

Every figure comes from irkit's own extraction and revisitop evaluation; nothing is trained.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_report  # noqa: E402

ASSETS = ROOT.parent / "shared" / "assets"


def pool_val_map(model, pool, val_classes: list[str], side: int, scales, distractors: int | None,
                 seed: int) -> float:
    """mAP (%) of every held-out image querying the other held-out images plus training distractors
    (``distractors`` drawn as the trainer draws them; None = all)."""
    from irkit.extract import embed_arrays
    from irkit.io.images import load_image, resize_max_side
    from irkit.train.select import labelled_map

    is_val = np.isin(np.asarray(pool.class_names)[pool.labels], val_classes)
    vrows, trows = np.flatnonzero(is_val), np.flatnonzero(~is_val)
    if distractors is not None:
        trows = np.sort(trows[np.random.default_rng([seed, 4099]).permutation(len(trows))[:distractors]])
    rows = np.concatenate([vrows, trows])
    x = embed_arrays(model, [resize_max_side(load_image(pool.paths[i]), side) for i in rows], scales)
    return labelled_map(x, pool.labels[rows], len(vrows))


def minidev_groups(model, data_dir: Path) -> dict[str, dict[str, float]]:
    """minidev mAP (%) per protocol and query-name prefix, plus "all"."""
    from irkit.pipeline import evaluate_dataset

    run = evaluate_dataset(str(data_dir), "minidev", model, None, progress=False)
    names = [Path(q).stem.split("_")[0] for q in run.dataset.qimlist]
    out: dict[str, dict[str, float]] = {}
    for p in ("easy", "medium", "hard"):
        aps = np.asarray(run.results[p]["aps"], dtype=float)
        out[p] = {"all": float(run.results[p]["map"])}
        for g in sorted(set(names)):
            keep = np.array([n == g for n in names]) & ~np.isnan(aps)
            if keep.any():
                out[p][f"{g} (n={int(keep.sum())})"] = float(aps[keep].mean())   # aps are in %
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="effnetlite2-gem")
    ap.add_argument("--before", default=None, help="weights of the reference (default: the preset's own)")
    ap.add_argument("--after", required=True, help="weights to compare (e.g. a run's best.safetensors)")
    ap.add_argument("--pool", default=str(ASSETS / "train" / "real-multiview"))
    ap.add_argument("--val-classes", required=True, help="comma-separated held-out class names of the run")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (draws the trainer's distractors)")
    ap.add_argument("--val-side", type=int, default=288)
    ap.add_argument("--val-distractors", type=int, default=128)
    ap.add_argument("--data-dir", default=str(ASSETS / "datasets"))
    args = ap.parse_args(argv)

    from irkit.data.labelled import folder_per_class
    from irkit.models.registry import build_model

    print(machine_report(), flush=True)
    pool = folder_per_class(args.pool)
    val = [c for c in args.val_classes.split(",") if c]
    missing = sorted(set(val) - set(pool.class_names))
    if missing:
        ap.error(f"--val-classes: no class {missing} in {args.pool}")
    for name, weights in (("before", args.before), ("after", args.after)):
        model = build_model(args.preset, weights=weights) if weights else build_model(args.preset)
        train_setting = pool_val_map(model, pool, val, args.val_side, [1.0], args.val_distractors, args.seed)
        test_setting = pool_val_map(model, pool, val, 448, None, None, args.seed)
        print(f"\n{name} ({weights or args.preset + ' default weights'})")
        print(f"  pool validation, training setting ({args.val_side} px, 1 scale, {args.val_distractors} distractors):"
              f" {train_setting:.2f}")
        print(f"  pool validation, test setting (448 px, the preset's scales, every training image): {test_setting:.2f}")
        for p, groups in minidev_groups(model, Path(args.data_dir)).items():
            print(f"  minidev {p:6s} " + "  ".join(f"{g} {v:.2f}" for g, v in groups.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

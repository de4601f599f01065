"""Model selection on held-out classes: the class-disjoint validation split (data.val_classes /
data.val_class_names), validation mAP of image recipes, best.safetensors + early stopping, the
λ / top-k choice of a re-ranker (λ = 0 when re-ranking hurts) and rerank.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from irkit.errors import ConfigError
from irkit.train.data_kinds import load_source, split_val
from irkit.train.select import label_gnd, load_rerank_choice, save_rerank_choice, select_rerank
from irkit.train.trainer import Trainer, make_config

from test_trainer import TINY, _png  # noqa: F401  (registers the test-tiny preset)


def _folder(root: Path, classes=(("a", 3), ("b", 3), ("c", 2), ("d", 2), ("e", 2))) -> Path:
    import cv2

    for k, (c, n) in enumerate(classes):
        base = np.random.default_rng(k).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        for i in range(n):
            img = cv2.resize(base, (64, 48), interpolation=cv2.INTER_NEAREST)
            (root / c).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / c / f"{c}{i}.png"), img)
    return root


def _cfg(tmp_path, folder, *extra):
    tiny = [o for o in TINY if not o.startswith(("data.kind", "data.num_scenes", "data.batch_size"))]
    return make_config("gem-contrastive", tiny + ["data.kind=folder", f"data.path={folder}", "data.batch_size=4",
                                                   f"out_dir={tmp_path / 'run'}", "data.val_max_side=64", *extra])


def test_val_split_is_by_class(tmp_path):
    folder = _folder(tmp_path / "pool")
    cfg = _cfg(tmp_path, folder, "data.val_class_names=[b,d]")
    train, val = split_val(cfg, load_source(cfg)[0])
    assert sorted(val.class_names) == ["b", "d"] and len(val) == 5
    assert sorted(train.class_names) == ["a", "c", "e"] and train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    cfg = _cfg(tmp_path, folder, "data.val_classes=2", "seed=3")
    a = split_val(cfg, load_source(cfg)[0])[1].class_names
    b = split_val(cfg, load_source(cfg)[0])[1].class_names
    assert a == b and len(a) == 2                                       # drawn by the seed, reproducible
    cfg = _cfg(tmp_path, folder, "data.val_class_names=[zz]")
    with pytest.raises(ConfigError, match="no class named"):
        split_val(cfg, load_source(cfg)[0])
    cfg = _cfg(tmp_path, folder)
    assert split_val(cfg, load_source(cfg)[0])[1] is None


def test_image_recipe_validates_keeps_best_and_stops_early(tmp_path):
    folder = _folder(tmp_path / "pool")
    cfg = _cfg(tmp_path, folder, "data.val_class_names=[b,d]", "steps=12", "eval.every=2", "eval.at_start=true",
               "eval.patience=2", "ckpt_every=100", "optim.lr=0")            # lr 0: never better than step 0
    trainer = Trainer(cfg)
    assert "held out" in trainer.data.description and trainer.num_classes == 3
    summary = trainer.fit()
    rows = (tmp_path / "run" / "eval.csv").read_text().strip().splitlines()
    assert "val_map" in rows[0].split(",")
    assert summary["best"]["step"] == 0 and summary["best"]["metric"] == "val_map"
    assert summary["stopped_early"] and summary["step"] == 4                 # 2 evaluations without a gain
    best = tmp_path / "run" / "best.safetensors"
    assert best.is_file() and json.loads(best.with_suffix(".json").read_text())["best"]["step"] == 0


def _revisitop_ap(order: list[int], positives: set[int], junk: set[int]) -> float:
    """AP by the revisitop trapezoid rule, written out from its definition."""
    kept = [i for i in order if i not in junk]
    hits = [r for r, i in enumerate(kept) if i in positives]
    return sum(((k / r if r else 1.0) + (k + 1) / (r + 1)) / 2 / len(positives) for k, r in enumerate(hits))


def test_validation_ranks_held_out_images_among_training_distractors(tmp_path):
    from irkit.extract import embed_arrays
    from irkit.io.images import load_image, resize_max_side

    folder = _folder(tmp_path / "pool")
    cfg = _cfg(tmp_path, folder, "data.val_class_names=[b,d]", "data.val_distractors=4")
    trainer = Trainer(cfg)
    out = trainer.recipe.validate(trainer)
    assert out["val_images"] == 5 and out["val_distractors"] == 4
    # reference: the same model's descriptors, ranked by brute force, AP from its definition
    val, train = trainer.data.val, trainer.data.source
    picks = sorted(np.random.default_rng([int(cfg.seed), 4099]).permutation(len(train))[:4].tolist())
    paths = list(val.paths) + [train.paths[i] for i in picks]
    model = trainer.recipe.export().eval()
    x = embed_arrays(model, [resize_max_side(load_image(p), 64) for p in paths], [1.0])
    lab = np.asarray(val.labels)
    aps = [_revisitop_ap(np.argsort(-(x @ x[j]), kind="stable").tolist(),
                         {int(i) for i in np.flatnonzero(lab == lab[j]) if i != j}, {j}) for j in range(len(lab))]
    assert out["val_map"] == pytest.approx(100 * np.mean(aps), abs=1e-6)
    # distractors can only push positives down
    trainer.cfg.data.val_distractors = 0
    assert trainer.recipe.validate(trainer)["val_map"] >= out["val_map"] - 1e-9


def test_select_rerank_keeps_global_when_reranking_hurts_and_uses_a_good_one():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 4)
    emb = rng.normal(size=(len(labels), 8)) + 0.8 * np.eye(8)[labels]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = np.arange(0, len(labels), 2)
    sim = emb[q] @ emb.T
    gnd = label_gnd(labels[q], labels, q)
    assert gnd[0]["junk"] == [0] and 0 not in gnd[0]["easy"] and set(gnd[0]["easy"]) == {1, 2, 3}
    calls = []

    def bad(j, rows):                      # anti-correlated with the truth
        calls.append(len(rows))
        return (labels[rows] != labels[q[j]]).astype(float)

    choice = select_rerank(sim, gnd, bad, lambdas=(0.5, 1.0), topks=(5, 10))
    assert choice["lambda"] == 0.0 and choice["val_map"] == choice["val_map_global"]
    assert calls == [10] * len(q) and 0 not in []                         # each query scored once, top-10
    good = select_rerank(sim, gnd, lambda j, rows: (labels[rows] == labels[q[j]]).astype(float),
                         lambdas=(0.5, 2.0), topks=(5, 23))
    assert good["lambda"] > 0 and good["val_map"] >= good["val_map_global"]
    assert good["val_map"] == pytest.approx(100.0)
    assert {(g["lambda"], g["topk"]) for g in good["grid"]} == {(l, k) for l in (0.0, 0.5, 2.0) for k in (5, 23)}
    with pytest.raises(ConfigError):
        select_rerank(sim, gnd, bad, lambdas=(-1.0,))
    with pytest.raises(ConfigError):
        select_rerank(sim, gnd[:2], bad)


def test_rerank_choice_file(tmp_path):
    ckpt = tmp_path / "best.safetensors"
    assert load_rerank_choice(ckpt) is None and load_rerank_choice(None) is None
    save_rerank_choice({"lambda": 0.25, "topk": 50, "val_map": 70.0}, tmp_path, checkpoint=str(ckpt))
    got = load_rerank_choice(ckpt)
    assert got["lambda"] == 0.25 and got["topk"] == 50 and got["checkpoint"] == str(ckpt)
    assert load_rerank_choice(tmp_path)["topk"] == 50
    (tmp_path / "rerank.json").write_text('{"lambda": "x"}')
    with pytest.raises(ConfigError, match="rerank.json"):
        load_rerank_choice(ckpt)
    (tmp_path / "rerank.json").write_text('{"lambda": -1, "topk": 5}')
    with pytest.raises(ConfigError, match=">= 0"):
        load_rerank_choice(ckpt)


def test_min_gain_keeps_global_for_a_noise_level_gain():
    sim = np.array([[0.9, 0.8, 0.7, 0.1]])
    gnd = [{"easy": [1], "hard": [], "junk": [], "bbx": None}]
    swap = lambda j, rows: (rows == 1).astype(float)                      # noqa: E731  moves the positive up
    free = select_rerank(sim, gnd, swap, lambdas=(1.0,), topks=(3,))
    assert free["lambda"] == 1.0 and free["val_map"] == 100.0 and free["val_map_global"] == 25.0
    guarded = select_rerank(sim, gnd, swap, lambdas=(1.0,), topks=(3,), min_gain=80.0)
    assert guarded["lambda"] == 0.0 and guarded["val_map"] == 25.0 and guarded["best_lambda"] == 1.0
    with pytest.raises(ConfigError):
        select_rerank(sim, gnd, swap, min_gain=-1)

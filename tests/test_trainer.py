"""Trainer: every recipe runs a few steps and checkpoints; --resume continues exactly; configs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from irkit.config import apply_overrides
from irkit.errors import ConfigError
from irkit.models.base import GlobalModel
from irkit.models.registry import Preset, get_preset, register_preset
from irkit.nn.pooling import GeM
from irkit.models.registry import build_model
from irkit.train.trainer import Trainer, make_config


class TinyNet(GlobalModel):
    """Three strided convs -> GeM -> FC -> L2: a backbone small enough for CPU tests."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.dim = dim
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
        self.pool = GeM()
        self.fc = nn.Linear(32, dim)

    def forward(self, x):
        return F.normalize(self.fc(self.pool(self.backbone(x))), dim=-1)


try:
    get_preset("test-tiny")
except ConfigError:
    register_preset(Preset("test-tiny", lambda **kw: TinyNet(**kw), "tests only"))

TINY = ["model.preset=test-tiny", "model.pretrained=false", "data.kind=scenes", "data.num_scenes=6",
        "data.image_size=64", "data.batch_size=6", "data.per_class=2", "progress=false", "log_every=1",
        "loss.queue_size=24", "data.workers=0", "schedule.warmup_steps=1", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from irkit.data.training import synthetic_scenes

    folder = tmp_path_factory.mktemp("scenes")
    synthetic_scenes(folder, 6, size=96, seed=0)
    return folder


def _cfg(recipe: str, out: Path, scenes: Path, *extra: str):
    return make_config(recipe, TINY + [f"data.path={scenes}", f"out_dir={out}", *extra])


@pytest.mark.parametrize("recipe,extra", [
    ("cvnet-global", []), ("cfcd", ["loss.stage2_step=1"]),
    ("cfcd", ["loss.stage2_step=1", "loss.cfcd_negatives=in-batch"]), ("rmac-triplet", ["model.regions=grid"]),
    ("rmac-triplet", ["model.regions=proposals", "model.proposals_top_n=3"]), ("gem-contrastive", []),
    ("joint", []),
])
def test_each_recipe_runs_and_checkpoints(tmp_path, scenes, recipe, extra):
    cfg = _cfg(recipe, tmp_path, scenes, "steps=3", "ckpt_every=2", *extra)
    summary = Trainer(cfg).fit()
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest == {"step": 3, "path": "step_0000003"}
    ckpt = tmp_path / "checkpoints" / "step_0000003"
    for name in ("model.safetensors", "model.json", "train.safetensors", "train_state.pt", "config.json"):
        assert (ckpt / name).is_file()
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0].startswith("step,lr,loss")
    assert all(len(r.split(",")) == len(rows[0].split(",")) for r in rows)
    meta = json.loads((tmp_path / "model.json").read_text())
    model = build_model(meta["preset"], weights=tmp_path / "model.safetensors", **meta["options"])
    x = torch.rand(2, 3, 64, 64)
    d = model(x)
    assert d.shape[0] == 2 and torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)
    assert meta["recipe"] == recipe and meta["step"] == 3
    assert meta["preset"] == ("rmac-regions" if recipe == "rmac-triplet" else "test-tiny")
    if recipe == "cfcd":
        assert "matches" in rows[0]


def test_old_checkpoints_pruned_and_refuse_overwrite(tmp_path, scenes):
    cfg = _cfg("joint", tmp_path, scenes, "steps=4", "ckpt_every=1", "keep_checkpoints=2")
    Trainer(cfg).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003", "step_0000004"]
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(cfg).fit()


class _Kill(Exception):
    pass


@pytest.mark.parametrize("recipe", ["cvnet-global", "cfcd"])
def test_resume_after_interruption_is_exact(tmp_path, scenes, recipe):
    """Kill after step 3 (last checkpoint at step 2), resume, finish: same state as one straight run."""
    # cfcd: stage 2 starts at step 1, the resume at step 2 must reuse the persisted stage-1 predictions
    extra = ["steps=5", "ckpt_every=2", "loss.stage2_step=1", "data.workers=0"]
    ref = Trainer(_cfg(recipe, tmp_path / "ref", scenes, *extra))
    ref.fit()

    def kill(trainer, step):
        if step == 3:
            raise _Kill()

    cfg = _cfg(recipe, tmp_path / "run", scenes, *extra)
    with pytest.raises(_Kill):
        Trainer(cfg, on_step=kill).fit()
    resumed = Trainer(cfg)
    summary = resumed.fit(resume=True)
    assert summary["start_step"] == 2 and resumed.step == 5
    a, b = ref.recipe.state_dict(), resumed.recipe.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.scheduler.state_dict()["last_epoch"] == ref.scheduler.state_dict()["last_epoch"] == 5
    sa, sb = ref.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in sa:
        for name, v in sa[k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k][name])), (k, name)
    steps = [int(r.split(",")[0]) for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5]      # the interrupted step 3 is logged once


def test_cfcd_stage1_predictions_are_the_classifier_argmax(tmp_path, scenes):
    """When stage 2 starts, every training image's prediction = argmax cos(descriptor, MadaCos weight)."""
    cfg = _cfg("cfcd", tmp_path, scenes, "steps=2", "loss.stage2_step=1", "loss.local_negatives=3")
    ref = {}

    def predict_independently(trainer, step):
        if step != 1:
            return
        r = trainer.recipe
        r.eval()
        with torch.no_grad():
            for i in range(len(trainer.labels)):
                d = F.normalize(r.model(trainer.dataset[(i, cfg.seed, 0)][0][None]), dim=1)
                ref[i] = int((d @ F.normalize(r.cls.weight, dim=1).T).argmax())
        trainer._train_mode()

    trainer = Trainer(cfg, on_step=predict_independently)
    trainer.fit()
    assert trainer.recipe.stage1_pred.tolist() == [ref[i] for i in range(len(trainer.labels))]
    # a resumed run takes them from the checkpoint rather than predicting again with later weights
    resumed = Trainer(_cfg("cfcd", tmp_path, scenes, "steps=3", "loss.stage2_step=1", "loss.local_negatives=3"))

    def must_not_run(*_a, **_k):
        raise AssertionError("stage-1 predictions recomputed on resume")

    resumed.recipe.predict_classes = must_not_run
    assert resumed.fit(resume=True)["start_step"] == 2
    assert resumed.recipe.stage1_pred.tolist() == trainer.recipe.stage1_pred.tolist()


def test_cfcd_refuses_an_unknown_negative_mode(tmp_path, scenes):
    with pytest.raises(ConfigError, match="cfcd_negatives"):
        Trainer(_cfg("cfcd", tmp_path, scenes, "loss.cfcd_negatives=hardest"))


def test_cfcd_negatives_are_the_images_the_classifier_confused(tmp_path, scenes):
    cfg = _cfg("cfcd", tmp_path, scenes, "steps=3", "loss.stage2_step=0", "loss.local_negatives=3")
    trainer = Trainer(cfg)
    labels = torch.as_tensor(trainer.labels)
    assert labels.tolist() == list(range(6))            # label-free scenes: one class per photo
    # images 1, 2 were called class 0; images 3, 4, 5 class 2; nothing was called class 1
    trainer.recipe.stage1_pred = torch.tensor([0, 0, 0, 2, 2, 2])
    seen = []
    original = trainer.recipe._confusion_negative_maps

    def spy(classes, device):
        rows, maps = original(classes, device)
        seen.append((classes, rows))
        assert maps.shape[:2] == (len(classes), 3)
        return rows, maps

    trainer.recipe._confusion_negative_maps = spy
    summary = trainer.fit()
    assert np.isfinite(summary["loss"]) and len(seen) == 3
    checked = set()
    for classes, rows in seen:
        for c, row in zip(classes, rows.tolist()):
            assert c not in row and len(set(row)) == 3   # other classes, no repeats
            if c == 2:
                assert set(row) == {3, 4, 5}
            elif c == 0:
                assert {1, 2} <= set(row)                # both confused images, then one random
            checked.add(c)
    assert {0, 2} <= checked


def test_resume_without_checkpoint_starts_fresh(tmp_path, scenes):
    summary = Trainer(_cfg("gem-contrastive", tmp_path, scenes, "steps=1")).fit(resume=True)
    assert summary["start_step"] == 0 and summary["step"] == 1


def test_config_overrides_and_errors(tmp_path):
    cfg = make_config("cfcd", ["OPTIM.LR", "0.5", "data.batch_size=8", "model.options.dim=64",
                               "eval.scales=0.7071,1", f"out_dir={tmp_path}"])
    assert cfg.optim.lr == 0.5 and cfg.data.batch_size == 8 and cfg.model.options == {"dim": 64}
    assert cfg.eval.scales == [0.7071, 1.0] and cfg.model.preset == "cfcd-r50"
    assert cfg.loss.stage2_step == 50000          # from irkit/configs/cfcd.yaml
    with pytest.raises(ConfigError, match="optim has no field 'lrr'"):
        make_config("cfcd", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        make_config("cfcd", ["steps=many"])
    with pytest.raises(ConfigError, match="multiple of data.per_class"):
        make_config("joint", ["data.batch_size=7", "data.per_class=2"])
    with pytest.raises(ConfigError, match="unknown training recipe"):
        make_config("nope")
    with pytest.raises(ConfigError, match="has no value"):
        make_config("joint", ["steps"])
    yaml_file = tmp_path / "my.yaml"
    yaml_file.write_text("steps: 7\noptim: {lr: 0.25}\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        make_config("joint", [], yaml_file)
    yaml_file.write_text("steps: 7\noptim: {lr: 0.25}\n")
    cfg = make_config("joint", ["steps=9"], yaml_file)
    assert cfg.steps == 9 and cfg.optim.lr == 0.25


@dataclass
class _M:
    depth: int = 50
    reduction_dim: int = 2048


@dataclass
class _T:
    model: _M = field(default_factory=_M)
    weights: str | None = None
    data_dir: str = ""
    scales: tuple[float, ...] = (1.0,)


def test_cvnet_yacs_aliases():
    from irkit.config import CVNET_TEST_ALIASES

    M, T = _M, _T
    cfg = apply_overrides(T(), ["MODEL.DEPTH", "101", "TEST.WEIGHTS", "ck.pyth", "TEST.SCALE_LIST",
                                "[0.7071, 1.0, 1.4142]", "data_dir=/d"], CVNET_TEST_ALIASES)
    assert cfg == T(M(101, 2048), "ck.pyth", "/d", (0.7071, 1.0, 1.4142))


def test_cli_train_and_periodic_eval(tmp_path, scenes, minidev_dir, capsys):
    from irkit.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "gem-contrastive", *TINY, f"data.path={scenes}", f"out_dir={out}", "steps=2",
               "eval.every=1", f"eval.data_dir={minidev_dir}", "eval.name=minidev", "eval.max_side=96"])
    assert rc == 0
    rows = (out / "eval.csv").read_text().strip().splitlines()
    assert rows[0] == "step,dataset,easy,medium,hard" and len(rows) == 3     # step 1 and final
    assert 0 <= float(rows[-1].split(",")[3]) <= 100
    rc = main(["train", "gem-contrastive", *TINY, f"data.path={scenes}", f"out_dir={out}", "steps=3", "--resume"])
    assert rc == 0 and json.loads((out / "latest.json").read_text())["step"] == 3
    assert main(["train", "gem-contrastive", "optim.nope=1"]) == 1
    assert "optim has no field 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ data
def _png(path: Path, seed: int, size=(40, 50)) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    cv2.imwrite(str(path), img)
    return path


def test_folder_pairs_and_gldv2_sources(tmp_path):
    from irkit.data import training as T
    from irkit.errors import DatasetError

    for c, n in (("b_cls", 2), ("a_cls", 3)):
        for i in range(n):
            _png(tmp_path / "folder" / c / f"{i}.png", i)
    data = T.folder_per_class(tmp_path / "folder")
    assert data.class_names == ["a_cls", "b_cls"] and data.labels.tolist() == [0, 0, 0, 1, 1]

    (tmp_path / "pairs.csv").write_text("query,positive,cluster\nq1.jpg,p1.jpg,7\nq2.jpg,p2.jpg,3\np1.jpg,x.jpg,7\n")
    data = T.pairs_csv(tmp_path / "pairs.csv")
    assert [p.name for p in data.paths] == ["q1.jpg", "p1.jpg", "q2.jpg", "p2.jpg", "x.jpg"]
    assert data.labels.tolist() == [1, 1, 0, 0, 1] and data.num_classes == 2
    (tmp_path / "bad.csv").write_text("query,positive,cluster\nq1.jpg,p1.jpg,7\np1.jpg,z.jpg,8\n")
    with pytest.raises(DatasetError, match="clusters 7 and 8"):
        T.pairs_csv(tmp_path / "bad.csv")

    (tmp_path / "train_clean.csv").write_text("landmark_id,images\n5,abc111 abd222\n2,aaa333\n9,bbb444 bbc555 bbd666\n")
    data = T.gldv2_clean(tmp_path / "train_clean.csv", tmp_path / "img", min_images=2)
    assert data.num_classes == 2 and data.class_names == ["5", "9"]
    assert data.paths[0] == tmp_path / "img" / "a" / "b" / "c" / "abc111.jpg"
    assert data.labels.tolist() == [0, 0, 1, 1, 1]


def test_balanced_batches_are_deterministic_grouped_and_sharded():
    from irkit.data.training import BalancedBatches

    labels = np.repeat(np.arange(10), 3)
    s = BalancedBatches(labels, batch_size=8, per_class=2, seed=3)
    b5 = s.batch(5)
    assert b5 == BalancedBatches(labels, 8, 2, seed=3, start_step=5).batch(5)
    assert list(BalancedBatches(labels, 8, 2, seed=3, start_step=5, total_steps=6)) == [b5]
    idx = [i for i, _, _ in b5]
    groups = [labels[idx[k:k + 2]] for k in range(0, 8, 2)]
    assert all(g[0] == g[1] for g in groups) and len({int(g[0]) for g in groups}) == 4
    assert [slot for _, _, slot in b5] == [0, 1] * 4
    shards = [BalancedBatches(labels, 8, 2, seed=3, shard=(r, 2)).batch(5) for r in range(2)]
    assert shards[0] + shards[1] == b5
    assert s.batch(6) != b5


def test_crop_flip_moves_the_box_with_the_pixels():
    from irkit.data.training import random_resized_crop

    img = np.zeros((60, 80, 3), np.uint8)
    img[10:30, 40:70] = 255                                   # the box [40, 10, 70, 30]
    for seed in range(6):
        out, box = random_resized_crop(img, 48, np.random.default_rng(seed), (1.0, 1.2), True, (40, 10, 70, 30))
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        assert out.shape == (48, 48, 3)
        if x2 - x1 > 2 and y2 - y1 > 2:
            assert out[y1 + 1:y2 - 1, x1 + 1:x2 - 1].min() > 200   # inside the box: white
        mask = out.max(2) > 200
        ys, xs = np.nonzero(mask)
        if len(xs):
            assert xs.min() >= x1 - 1 and xs.max() <= x2 and ys.min() >= y1 - 1 and ys.max() <= y2


def test_synthetic_view_set_gives_overlap_box(tmp_path):
    from irkit.data.training import SyntheticViewSet, synthetic_scenes
    from irkit.io.images import InputSpec

    photos = synthetic_scenes(tmp_path, 3, size=96, seed=0)
    ds = SyntheticViewSet(photos, 64, InputSpec())
    img0, lab0, box0 = ds[(1, 123, 0)]
    img1, lab1, box1 = ds[(1, 123, 1)]
    assert lab0 == lab1 == 1 and img0.shape == img1.shape == (3, 64, 64)
    assert box1.tolist() == [-1.0] * 4
    x1, y1, x2, y2 = box0.tolist()
    assert 0 <= x1 < x2 <= 63 and 0 <= y1 < y2 <= 63 and (x2 - x1) * (y2 - y1) < 64 * 64
    assert torch.equal(ds[(1, 123, 1)][0], img1)            # deterministic per key

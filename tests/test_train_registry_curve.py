"""One registry of recipes (configs, CLI, validation), the data-kind registry, the rmac-regions preset
loading what rmac-triplet trained, and the learning curve (CSV + PNG) every run writes."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from irkit.errors import ConfigError
from irkit.models.base import GlobalModel
from irkit.models.registry import Preset, build_model, get_preset, register_preset
from irkit.nn.pooling import GeM
from irkit.train.data_kinds import data_kind_names
from irkit.train.registry import RECIPES, get_recipe, recipe_names
from irkit.train.trainer import CONFIG_DIR, Trainer, make_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Tiny(GlobalModel):
    """conv x2 -> GeM (``pool``, so region recipes can tap the conv map) -> FC -> L2."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.pool = GeM()
        self.fc = nn.Linear(16, dim)

    def forward(self, x):
        return F.normalize(self.fc(self.pool(self.backbone(x))), dim=-1)


try:
    get_preset("test-train-tiny")
except ConfigError:
    register_preset(Preset("test-train-tiny", lambda **kw: _Tiny(**kw), "tests only"))

TINY = ["model.preset=test-train-tiny", "model.pretrained=false", "data.kind=scenes", "data.num_scenes=6",
        "data.image_size=48", "data.batch_size=6", "data.per_class=2", "progress=false", "log_every=1",
        "data.workers=0", "schedule.warmup_steps=1", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from irkit.data.training import synthetic_scenes

    folder = tmp_path_factory.mktemp("scenes")
    synthetic_scenes(folder, 6, size=64, seed=0)
    return folder


def test_every_recipe_has_a_config_and_every_config_a_recipe():
    names = recipe_names()
    assert set(names) == {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert "cvnet-rerank" in names and len(names) == len(RECIPES)
    for name in names:
        cfg = make_config(name)                       # the shipped defaults validate
        assert cfg.recipe == name and get_recipe(name).summary
    with pytest.raises(ConfigError, match="available: " + ", ".join(names)):
        make_config("no-such-recipe")


def test_cli_lists_the_registered_recipes(capsys):
    from irkit.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name in recipe_names():
        assert name in out


def test_data_kinds_come_from_the_registry(tmp_path):
    kinds = data_kind_names()
    assert {"synthetic", "scenes", "gldv2", "pairs", "sfm120k", "folder"} <= set(kinds)
    with pytest.raises(ConfigError, match="data.kind must be one of " + ", ".join(kinds)):
        make_config("joint", ["data.kind=photoz", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="needs in-batch positives"):
        make_config("joint", ["data.per_class=1", "data.batch_size=4", f"out_dir={tmp_path}"])


def test_rmac_regions_preset_loads_what_rmac_triplet_trained(tmp_path, scenes):
    cfg = make_config("rmac-triplet", TINY + [f"data.path={scenes}", f"out_dir={tmp_path}", "steps=2",
                                             "model.regions=proposals", "model.proposals_top_n=3",
                                             "model.options.dim=12"])
    trainer = Trainer(cfg)
    trainer.fit()
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["preset"] == "rmac-regions"
    assert meta["options"]["base"] == "test-train-tiny" and meta["options"]["regions"] == "proposals"
    assert meta["options"]["base_options"] == {"dim": 12} and meta["options"]["top_n"] == 3
    model = build_model(meta["preset"], weights=tmp_path / "model.safetensors", **meta["options"])
    trained = trainer.recipe.export().eval()
    x = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        ref, got = trained(x), model(x)
    assert got.shape == (3, 16) and torch.equal(ref, got)
    # the proposal head's trained weights are what was loaded, not a fresh initialisation
    fresh = build_model("rmac-regions", **meta["options"])
    with torch.no_grad():
        assert not torch.allclose(fresh(x), got)


def test_each_run_writes_its_learning_curve(tmp_path, scenes, minidev_dir, capsys):
    from irkit.cli import main

    out = tmp_path / "run"
    rc = main(["train", "gem-contrastive", *TINY, f"data.path={scenes}", f"out_dir={out}", "steps=3",
               "eval.every=2", f"eval.data_dir={minidev_dir}", "eval.name=minidev", "eval.max_side=64"])
    assert rc == 0
    err = capsys.readouterr().err
    png = out / "learning_curve.png"
    assert f"learning curve: {png}" in err and f"metrics: {out / 'metrics.csv'}" in err
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 600     # loss panel + mAP panel
    assert img.std() > 10                                                    # something is drawn
    rows = (out / "eval.csv").read_text().strip().splitlines()
    assert rows[0] == "step,dataset,easy,medium,hard" and [int(r.split(",")[0]) for r in rows[1:]] == [2, 3]
    assert png.parent == (out / "model.safetensors").parent                  # next to the checkpoint


def test_plot_false_writes_no_png(tmp_path, scenes):
    cfg = make_config("joint", TINY + [f"data.path={scenes}", f"out_dir={tmp_path}", "steps=1", "plot=false"])
    summary = Trainer(cfg).fit()
    assert summary["files"]["learning_curve"] is None and not (tmp_path / "learning_curve.png").exists()
    assert (tmp_path / "metrics.csv").is_file()


def test_folder_kind_applies_min_images_and_max_classes(tmp_path):
    from irkit.train.data_kinds import load_source

    for c, n in (("a", 3), ("b", 1), ("c", 2), ("d", 2)):
        for i in range(n):
            (tmp_path / "f" / c).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "f" / c / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    base = ["data.kind=folder", f"data.path={tmp_path / 'f'}", f"out_dir={tmp_path / 'o'}"]
    data, label_free, _ = load_source(make_config("joint", base))
    assert not label_free and data.num_classes == 4 and len(data) == 8
    data, _, _ = load_source(make_config("joint", base + ["data.min_images=2", "data.max_classes=2"]))
    assert data.class_names == ["a", "c"] and data.labels.tolist() == [0, 0, 0, 1, 1]


def test_curve_draws_the_held_out_validation_map(tmp_path):
    """An image recipe's eval.csv holds val_map only: the curve gets its mAP panel (one panel is
    450 px wide at the saved size, two are 900)."""
    from PIL import Image

    from irkit.train.curves import plot_learning_curve

    (tmp_path / "metrics.csv").write_text("step,loss\n5,2.0\n10,1.5\n")
    assert Image.open(plot_learning_curve(tmp_path)).size[0] == 450
    (tmp_path / "eval.csv").write_text("step,val_map,val_images\n0,90.5,10\n10,92.0,10\n")
    assert Image.open(plot_learning_curve(tmp_path)).size[0] == 900

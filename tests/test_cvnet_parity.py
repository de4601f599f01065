"""Number-by-number parity of irkit's CVNet (preset ``cvnet-r50``) with the official implementation,
on the shared fixtures (a deterministic random checkpoint; ../shared/reference/cvnet_parity)."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from irkit.io.images import resize_scale, to_tensor
from irkit.models.registry import build_model

PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "cvnet_parity"
pytestmark = [
    pytest.mark.skipif(not (PARITY / "reference_outputs.npz").is_file(),
                       reason=f"CVNet parity fixtures absent ({PARITY}; they live in ../shared)"),
    pytest.mark.usefixtures("single_thread"),
]


def _max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(PARITY / "reference_outputs.npz"))


@pytest.fixture(scope="module")
def images_rgb():
    """The fixture images (stored BGR) as irkit's RGB arrays."""
    return [np.ascontiguousarray(np.load(PARITY / f"img{i}.npy")[:, :, ::-1]) for i in range(4)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("cvnet_make_checkpoint", PARITY / "make_checkpoint.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    sd = mk.build_state_dict(mk.read_keys(str(PARITY.parent / "cvnet_r50_state_dict_keys.txt")), mk.SEED)
    assert mk.state_dict_sha256(sd) == "d795e36e00dc4c0246552adfdc82b4154ce64164f90789ca232275d5b60e83eb", \
        "this torch's RNG stream differs; the fixtures do not apply"
    path = tmp_path_factory.mktemp("cvnet") / "cvnet_random.pyth"
    torch.save({"model_state": sd}, path)
    m = build_model("cvnet-r50", weights=path)
    assert m.load_report.complete and len(m.load_report.loaded) == 382
    return m


@pytest.fixture(scope="module")
def per_scale(model, images_rgb, ref):
    """Per-scale inputs, raw head outputs, descriptors and scale-1 maps."""
    out = {"hw": np.zeros((3, 4, 2), np.int64), "sha": [], "sum": np.zeros((3, 4)),
           "raw": np.zeros((3, 4, 2048), np.float32), "desc": np.zeros((3, 4, 2048), np.float32), "maps": []}
    spec = model.input_spec
    with torch.no_grad():
        for s, scale in enumerate(ref["scales"]):
            shas = []
            for i, img in enumerate(images_rgb):
                small = resize_scale(img, float(scale), spec.interp_down, spec.interp_up)
                out["hw"][s, i] = small.shape[:2]
                shas.append(hashlib.sha256(np.ascontiguousarray(small[:, :, ::-1]).tobytes()).hexdigest())
                x = to_tensor(small, spec)
                out["sum"][s, i] = x.double().sum().item()
                raw = model.head_raw(x[None])
                out["raw"][s, i] = raw[0].numpy()
                out["desc"][s, i] = torch.nn.functional.normalize(raw, dim=1)[0].numpy()
                if scale == 1.0:
                    out["maps"].append(model.rerank_map(x[None]))
            out["sha"].append(shas)
    return out


def test_preprocessing(per_scale, ref):
    assert np.array_equal(per_scale["hw"], ref["scaled_hw"])
    assert per_scale["sha"] == ref["scaled_uint8_sha256"].tolist()
    assert np.all(np.abs(per_scale["sum"] / ref["input_sum_f64"] - 1) <= 1e-9)


def test_global_descriptors(model, per_scale, ref):
    assert _max_abs(per_scale["desc"], ref["global_desc_per_scale"]) <= 1e-6
    assert _max_abs(per_scale["desc"][1], ref["global_desc_s1"]) <= 1e-6
    raw_ref = ref["global_head_raw"]
    assert _max_abs(per_scale["raw"], raw_ref) <= 2e-5 * np.abs(raw_ref).max()
    ms = torch.nn.functional.normalize(torch.from_numpy(per_scale["desc"]).mean(0), dim=1).numpy()
    assert _max_abs(ms, ref["global_desc_ms"]) <= 1e-6
    with torch.no_grad():  # forward() is the L2 descriptor itself
        assert _max_abs(model(to_tensor(np.load(PARITY / "img1.npy")[:, :, ::-1].copy(), model.input_spec)[None])[0],
                        ref["global_desc_s1"][1]) <= 1e-6


def test_multiscale_through_extract(model, images_rgb, ref):
    extract = pytest.importorskip("irkit.extract")
    desc = extract.embed_arrays(model, images_rgb, scales=[float(s) for s in ref["scales"]])
    assert desc.shape == (4, 2048) and desc.dtype == np.float32
    assert _max_abs(desc, ref["global_desc_ms"]) <= 1e-6
    assert _max_abs(extract.embed_arrays(model, images_rgb, scales=[1.0]), ref["global_desc_s1"]) <= 1e-6
    assert tuple(model.default_scales) == tuple(float(s) for s in ref["scales"])


def test_stage3_map(per_scale, ref):
    maps = per_scale["maps"]
    for i, m in enumerate(maps):
        assert tuple(m.shape[1:]) == tuple(ref["stage3_shape"][i])
        x = m.double()
        assert abs(x.mean().item() - ref["stage3_mean_f64"][i]) <= 1e-6 * abs(ref["stage3_mean_f64"][i])
        assert abs(x.std().item() - ref["stage3_std_f64"][i]) <= 1e-6 * ref["stage3_std_f64"][i]
    r = ref["stage3_img0_ch0to3"]
    assert _max_abs(maps[0][0, :4], r) <= 2e-5 * np.abs(r).max()


def test_correlation_and_branches(model, per_scale, ref):
    rr = model.reranker
    with torch.no_grad():
        levels = [rr.prepare(m) for m in per_scale["maps"]]
        sizes = np.array([[lv.shape[-2:] for lv in L] for L in levels])
        assert np.array_equal(sizes, ref["corr_branch_hw"])
        corr = rr.correlation(levels[0], levels[1])
    assert tuple(corr.shape) == tuple(ref["corr_shape_q0_k1"])
    assert _max_abs(corr[0, :, 0, 0], ref["corr_q0_k1_at_q00"]) <= 1e-5
    assert abs(corr.double().sum().item() - float(ref["corr_q0_k1_sum_f64"])) <= 1e-6 * float(ref["corr_q0_k1_sum_f64"])
    assert _max_abs(corr.double().mean(dim=(0, 2, 3, 4, 5)), ref["corr_q0_k1_mean_per_channel"]) <= 1e-6


def test_rerank_logits_and_scores(model, per_scale, ref):
    rr = model.reranker
    n = len(per_scale["maps"])
    logits = np.zeros((n, n, 2), np.float32)
    logits_ref_route = np.zeros((n, n, 2), np.float32)
    with torch.no_grad():
        levels = [rr.prepare(m) for m in per_scale["maps"]]
        for i in range(n):
            for j in range(n):
                logits[i, j] = rr.logits(levels[i], levels[j])[0].numpy()
                logits_ref_route[i, j] = rr.forward_reference(levels[i], levels[j])[0].numpy()
        # batched over candidates of equal size (img0 against itself twice, as a batch of 2)
        batch = [torch.cat([lv, lv]) for lv in levels[0]]
        assert _max_abs(rr.score(levels[0], batch), ref["rerank_score"][0, [0, 0]]) <= 1e-5
        # from raw maps (forward) too
        assert _max_abs(rr(per_scale["maps"][2], per_scale["maps"][3]), ref["rerank_score"][2, 3]) <= 1e-5
    assert _max_abs(logits, ref["rerank_logits"]) <= 2e-5
    assert _max_abs(logits_ref_route, ref["rerank_logits"]) <= 2e-5
    scores = torch.softmax(torch.from_numpy(logits), dim=-1)[..., 1].numpy()
    assert _max_abs(scores, ref["rerank_score"]) <= 1e-5


def test_float16_stored_maps_change_scores_negligibly(model, per_scale, ref):
    """Feature stores keep re-rank maps as float16 by default: the scores must not move."""
    rr = model.reranker
    with torch.no_grad():
        levels16 = [rr.prepare(m.half().float()) for m in per_scale["maps"]]
        scores16 = np.array([[float(rr.score(levels16[i], levels16[j])[0]) for j in range(4)] for i in range(4)])
    assert _max_abs(scores16, ref["rerank_score"]) <= 1e-4      # measured 4.7e-6

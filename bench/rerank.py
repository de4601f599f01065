"""CVNet re-ranking of ONE query's top-100: irkit vs the straightforward (published-style) loop.

    python bench/rerank.py [--sizes 512x384,1024x768] [--candidates 100] [--naive-candidates 3]
                           [--threads N (default: all cores)] [--budget-mb MiB]

Weights: the deterministic random R50 checkpoint of the parity fixtures when ../shared is present
(realistic activation ranges), else a seeded random init. Images: minidev photos resized to the
given size (query = the first, candidates cycle over ``--distinct`` others).

Variants, each in a fresh subprocess (so peak memory is its own):

* ``naive``: what the published test loop does per candidate: run the backbone on the database
  image again, build the full 4D correlation [9, hq, wq, hk, wk], run the 4D encoder with the plain
  :func:`conv4d_reference`. Measured on ``--naive-candidates`` candidates and extrapolated linearly
  to ``--candidates`` (said so in the output).
* ``irkit-cold``: :class:`CVNetScorer` over stored re-rank levels as extraction now stores them
  (packed prepared levels, float32; no backbone, no projection), nothing cached: every candidate
  read and expanded, fused correlation + first layer, channels-last encoder, batched within
  ``--budget-mb``.
* ``irkit-warm``: same with every candidate's expanded levels already in the scorer's LRU cache
  (the steady state over many queries). The cache itself (``cache MiB/image``, printed) is held
  before the timed section, so it is in the absolute peak but not in the working memory.
* ``irkit-fp16``: warm, from levels stored as float16 (a FeatureStore's default; max score change
  printed).
* ``irkit-raw``: cold, from raw 1024-channel maps (stores written before irkit stored levels).

Also printed: the machine's load (bench/_machine.py; a loud warning when other processes use the
cores), the FLOPs of one pair in irkit's route and the fraction of the fp32 matmul peak measured in
the same run (at the same threads) that the warm path reaches.

Memory = peak resident set (VmHWM, reset right before the timed section) minus the resident set
just before it, i.e. the working memory of the re-ranking itself; the absolute peak is printed too.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _machine import cores, machine_report, matmul_peak

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MINIDEV = SHARED / "assets" / "datasets" / "minidev" / "jpg"
PARITY = SHARED / "reference" / "cvnet_parity"


# ------------------------------------------------------------------------------------ utilities

def _mem_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM", "VmRSS")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) / 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _model():
    import torch

    from irkit.models.cvnet import CVNet, official_to_irkit

    torch.manual_seed(0)
    model = CVNet(50)
    if (PARITY / "make_checkpoint.py").is_file():
        spec = importlib.util.spec_from_file_location("mk", PARITY / "make_checkpoint.py")
        mk = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mk)
        sd = mk.build_state_dict(mk.read_keys(str(PARITY.parent / "cvnet_r50_state_dict_keys.txt")), 0)
        model.load_state_dict(official_to_irkit(sd))
    return model.eval()


def _images(size: tuple[int, int], n: int) -> list[np.ndarray]:
    import cv2

    from irkit.io.images import load_image

    w, h = size
    paths = sorted(MINIDEV.glob("*.jpg")) if MINIDEV.is_dir() else []
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if paths:
            img = load_image(paths[(i * 7) % len(paths)])
            out.append(np.ascontiguousarray(cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)))
        else:
            low = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
            out.append(np.ascontiguousarray(cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)))
    return out


class _Maps:
    """A FeatureStore stand-in: ``get_map(i)`` reads the map of row i from disk each time."""

    has_maps = True

    def __init__(self, folder: Path, distinct: int, fp16: bool = False, kind: str = "lv") -> None:
        self.folder, self.distinct, self.fp16, self.kind = folder, distinct, fp16, kind

    def get_map(self, i: int) -> np.ndarray:
        m = np.load(self.folder / f"{self.kind}{1 + i % self.distinct}.npy")
        return m.astype(np.float16).astype(np.float32) if self.fp16 else m


# -------------------------------------------------------------------------------------- workers

def prepare(folder: Path, size: tuple[int, int], distinct: int) -> None:
    """Images and their stage-3 maps (index 0 = query), as extraction would have stored them."""
    import torch

    from irkit.io.images import to_tensor

    model = _model()
    with torch.inference_mode():
        for i, img in enumerate(_images(size, distinct + 1)):
            np.save(folder / f"img{i}.npy", img)
            fmap = model.rerank_map(to_tensor(img, model.input_spec)[None])
            np.save(folder / f"map{i}.npy", fmap[0].numpy())
            np.save(folder / f"lv{i}.npy", model.reranker.pack(model.reranker.prepare(fmap)).numpy())


def worker(variant: str, folder: Path, n_cands: int, distinct: int, budget_mb: int) -> dict:
    import torch

    from irkit.io.images import to_tensor
    from irkit.search.rerank import CVNetScorer

    model = _model()
    rr = model.reranker
    qmap = np.load(folder / ("map0.npy" if variant in ("naive", "irkit-raw") else "lv0.npy"))
    if variant == "irkit-fp16":
        qmap = qmap.astype(np.float16).astype(np.float32)
    result: dict = {"variant": variant}
    with torch.inference_mode():
        if variant == "naive":
            q_levels = rr.prepare(torch.from_numpy(qmap)[None])
            images = [np.load(folder / f"img{1 + i % distinct}.npy") for i in range(n_cands)]
            before = _mem_mb()["VmRSS"]
            _reset_peak()
            t0 = time.perf_counter()
            scores = []
            for img in images:                       # the published loop: backbone again per pair
                k_map = model.rerank_map(to_tensor(img, model.input_spec)[None])
                corr = rr.correlation(q_levels, rr.prepare(k_map))
                x = corr
                for block in (rr.cv_learner.block1, rr.cv_learner.block2, rr.cv_learner.block3,
                              rr.cv_learner.block4):
                    for mod in block:
                        x = mod.forward_reference(x) if hasattr(mod, "forward_reference") else mod(x)
                logits = rr.cv_learner.mlp(x.flatten(2).mean(-1))
                scores.append(float(torch.softmax(logits, 1)[0, 1]))
                del corr, x
            seconds = time.perf_counter() - t0
        else:
            store = _Maps(folder, distinct, fp16=variant == "irkit-fp16",
                          kind="map" if variant == "irkit-raw" else "lv")
            warm = variant not in ("irkit-cold", "irkit-raw")
            scorer = CVNetScorer(rr, store, cache_bytes=(4 << 30) if warm else 0,
                                 memory_budget=None if budget_mb < 0 else budget_mb << 20)
            cands = np.arange(n_cands)
            if warm:   # every candidate row already projected (steady state over many queries)
                for i in cands:
                    scorer.levels(i)
                result["cache_mb_per_image"] = scorer._cached_bytes / len(cands) / 2**20
                scorer.hits = scorer.misses = 0
            scorer.score(qmap, cands[:1])   # one-time set-up (kernel weight layouts), as naive's query
            scorer.hits = scorer.misses = 0
            before = _mem_mb()["VmRSS"]
            _reset_peak()
            t0 = time.perf_counter()
            scores = scorer.score(qmap, cands).tolist()
            seconds = time.perf_counter() - t0
            result.update(cache_hits=scorer.hits, cache_misses=scorer.misses)
        mem = _mem_mb()
    result.update(n_scored=n_cands, seconds=seconds, rss_before_mb=before, peak_mb=mem["VmHWM"],
                  work_peak_mb=mem["VmHWM"] - before, scores=scores, threads=torch.get_num_threads())
    return result


def pair_flops(size: tuple[int, int], levels: int = 3, channels: int = 256) -> dict[str, float]:
    """FLOPs (multiply-add = 2) of one equal-size pair in irkit's route, by part: the two
    correlation matmuls (pivots x full-size levels), the first center-pivot layer's two 2D convs,
    and the later 4D layers (each = two 2D convs over strided pivots)."""
    from irkit.models.cvnet import CVLearner

    h, w = size
    h2, w2 = -(-h // 2), -(-w // 2)
    corr = 2 * (2 * (h2 * w2 * levels) * channels * (levels * h * w))
    first = 2 * (2 * (h2 * w2) * 16 * levels * levels * 25 * (h2 * w2))
    later, (ch, hh, ww) = 0.0, (16, h2, w2)
    learner = CVLearner(levels * levels)
    for block in (learner.block2, learner.block3, learner.block4):
        for i in range(0, len(block), 3):
            conv = block[i]
            s, k, o = conv.stride, conv.conv1.kernel_size[0], conv.conv1.out_channels
            ho, wo = -(-hh // s), -(-ww // s)
            later += 2 * (2 * (ho * wo) * o * ch * k * k * (ho * wo))
            ch, hh, ww = o, ho, wo
    return {"correlation": corr, "first layer": first, "later layers": later, "total": corr + first + later}


# ------------------------------------------------------------------------------------------ main

def _run_worker(args, variant: str, folder: Path, n: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--folder", str(folder), "--n", str(n),
           "--distinct", str(args.distinct), "--budget-mb", str(args.budget_mb), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(args))
    if proc.returncode:
        sys.exit(f"worker {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env(args) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512x384,1024x768", help="image sizes WxH, comma-separated")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--naive-candidates", type=int, default=3,
                    help="candidates the naive loop really scores (time extrapolated to --candidates)")
    ap.add_argument("--distinct", type=int, default=12, help="distinct database images (candidates cycle)")
    ap.add_argument("--threads", type=int, default=cores(), help="intra-op threads of every variant "
                    "(default: all usable cores)")
    ap.add_argument("--budget-mb", type=int, default=-1,
                    help="irkit's memory budget per batch (default: the scorer's, one pair at a time on CPU)")
    ap.add_argument("--variants", default="irkit-cold,irkit-warm,irkit-fp16,irkit-raw",
                    help="irkit variants to run besides naive (irkit-warm is always run)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker or args.prepare:
        import torch

        torch.set_num_threads(args.threads)
        if args.prepare:
            w, h = (int(v) for v in args.sizes.split("x"))
            prepare(Path(args.folder), (w, h), args.distinct)
            return
        print(json.dumps(worker(args.worker, Path(args.folder), args.n, args.distinct, args.budget_mb)))
        return

    variants = [v for v in args.variants.split(",") if v]
    if "irkit-warm" not in variants:
        variants.append("irkit-warm")
    print(machine_report())
    peak = matmul_peak(args.threads)
    print(f"fp32 matmul peak measured now (2048^3, {args.threads} thread(s)): {peak:.1f} GFLOP/s")
    print(f"CVNet R50 re-ranking of one query's top-{args.candidates}; {args.threads} thread(s); "
          f"irkit memory budget {'default' if args.budget_mb < 0 else f'{args.budget_mb} MiB'}; weights: "
          f"{'parity random checkpoint' if PARITY.is_dir() else 'seeded random init'}; "
          f"images: {'minidev' if MINIDEV.is_dir() else 'synthetic'}")
    for size_txt in args.sizes.split(","):
        w, h = (int(v) for v in size_txt.split("x"))
        with tempfile.TemporaryDirectory(prefix="irkit-bench-rerank-") as tmp:
            folder = Path(tmp)
            prep = subprocess.run([sys.executable, __file__, "--prepare", "--folder", tmp, "--sizes", size_txt,
                                   "--distinct", str(args.distinct), "--threads", str(args.threads)],
                                  capture_output=True, text=True, env=_env(args))
            if prep.returncode:
                sys.exit(f"preparing {size_txt} failed:\n{prep.stderr[-3000:]}")
            qshape = np.load(folder / "map0.npy", mmap_mode="r").shape
            corr_mib = 9 * (qshape[1] * qshape[2]) ** 2 * 4 / 2**20
            runs = {v: _run_worker(args, v, folder, args.candidates) for v in variants}
            runs["naive"] = _run_worker(args, "naive", folder, args.naive_candidates)
        n_naive = args.naive_candidates
        naive_total = runs["naive"]["seconds"] / n_naive * args.candidates
        print(f"\n== {w}x{h} (stage-3 map {qshape[1]}x{qshape[2]}; full 4D correlation {corr_mib:.0f} MiB)")
        print(f"{'variant':<12} {'s/cand':>8} {'s/top-' + str(args.candidates):>10} {'work MiB':>9} "
              f"{'peak MiB':>9}   note")
        for name in ("naive", *variants):
            r = runs[name]
            per = r["seconds"] / r["n_scored"]
            note = (f"measured on {n_naive} candidates, time extrapolated" if name == "naive"
                    else f"cache {r['cache_mb_per_image']:.1f} MiB/image, {r['cache_hits']} hits"
                    if "cache_mb_per_image" in r else f"{r['cache_misses']} projected")
            print(f"{name:<12} {per:8.3f} {per * args.candidates:10.1f} {r['work_peak_mb']:9.0f} "
                  f"{r['peak_mb']:9.0f}   {note}")
        fl = pair_flops((qshape[1], qshape[2]))
        warm_s = runs["irkit-warm"]["seconds"] / runs["irkit-warm"]["n_scored"]
        print(f"FLOPs of one pair (irkit route): {fl['total'] / 1e9:.1f} GFLOP (correlation "
              f"{fl['correlation'] / 1e9:.1f}, first layer {fl['first layer'] / 1e9:.1f}, later layers "
              f"{fl['later layers'] / 1e9:.1f}); warm path {fl['total'] / warm_s / 1e9:.1f} GFLOP/s = "
              f"{100 * fl['total'] / warm_s / 1e9 / peak:.0f}% of the matmul peak measured in this run "
              f"({peak:.1f} GFLOP/s); the peak's floor for top-{args.candidates}: "
              f"{fl['total'] * args.candidates / peak / 1e9:.1f} s")
        for name in [v for v in ("irkit-cold", "irkit-warm") if v in runs]:
            r = runs[name]
            print(f"ratio naive / {name}: time {naive_total / r['seconds']:.1f}x, working memory "
                  f"{runs['naive']['work_peak_mb'] / max(r['work_peak_mb'], 1.0):.1f}x "
                  f"(absolute peak {runs['naive']['peak_mb'] / r['peak_mb']:.1f}x)")
        naive_scores = np.array(runs["naive"]["scores"])
        diffs = {name: float(np.abs(np.array(runs[name]["scores"][:n_naive]) - naive_scores).max())
                 for name in ("irkit-cold", "irkit-warm", "irkit-raw") if name in runs}
        fp16 = (float(np.abs(np.array(runs["irkit-fp16"]["scores"]) - np.array(runs["irkit-warm"]["scores"])).max())
                if "irkit-fp16" in runs else 0.0)
        print("scores: max |irkit - naive| " + ", ".join(f"{k[6:]} {v:.2e}" for k, v in diffs.items())
              + f" (scores {naive_scores.min():.4f}..{naive_scores.max():.4f})"
              + (f"; float16-stored levels vs float32: max |diff| {fp16:.2e} over {args.candidates} candidates"
                 if "irkit-fp16" in runs else ""))
        if max(diffs.values()) > 1e-4 or fp16 > 1e-4:
            print("WARNING: irkit and the straightforward loop disagree beyond 1e-4")
    print(machine_report())


if __name__ == "__main__":
    main()

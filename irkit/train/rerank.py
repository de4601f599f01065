"""Recipe ``cvnet-rerank``: train a CVNet correlation-verification re-ranker on a frozen backbone.

METHODS §2: the backbone is frozen; the pyramid projections (``conv2ds``), the 4D encoder and the
head are trained with binary cross-entropy (2-way logits, cross-entropy with labels 1/0) on
(query, positive) and (query, negative) pairs; hard negatives are the most similar non-matching
images by global descriptor (top-``mining.num_hard`` per query, re-mined every
``mining.remine_every`` steps from a random part of the bank); Hide-and-Seek hides random grid cells
of the feature maps; a curriculum grows the share of hard negatives (vs random ones) and the hiding
probability.

Why a loop of its own instead of :class:`irkit.train.trainer.Trainer`: that trainer feeds image
batches through the trained model every step. Here the backbone is frozen, so every image's
stride-16 map and global descriptor are computed ONCE into a :class:`MapBank` (cached on disk in
``out_dir``) and training runs on pairs of cached maps only, which makes CPU training practical
(about 0.4 s per step of 16 pairs of 18x22 maps on two cores, instead of a backbone pass per image).

Data (``data.kind``):

* ``photos``: self-supervised. A folder of photos (``data.path``; "" or "auto" =
  :func:`irkit.data.photo_sources.locate_photo_pool`, which never returns minidev images); each photo
  gives ``data.views_per_photo`` random views (:func:`irkit.data.synthetic_pairs.random_view`:
  homography, colour jitter, blur, occluders, plus an optional darkening "night" change). Views of
  one photo are positives of each other; views of other photos are negatives.
* ``folder``: labelled, one sub-folder per class; ``gldv2``: GLDv2-clean CSV + image root.
  Images of one class are positives; ``data.views_per_image`` views each (1 = the image itself).

Everything per step is a pure function of ``(seed, step)`` (pair sampling, hiding), so
``--resume`` continues the same run. Output in ``out_dir``: ``checkpoints/step_N/`` (irkit model
checkpoint + optimiser state), ``latest.json``, ``model.safetensors`` + ``model.json`` (the full
model: backbone + trained re-ranker, loadable with ``build_model(preset, weights=...)``),
``metrics.csv`` (train) and ``val.csv`` (held-out photos: loss, accuracy, mean P(same) of
positives/negatives, ROC AUC).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from irkit.config import apply_overrides, from_dict, load_yaml, merge_dicts, to_dict
from irkit.errors import ConfigError, DatasetError
from irkit.train.checkpointing import append_csv, latest_checkpoint, truncate_csv, write_checkpoint
from irkit.train.curriculum import RerankCurriculum, Schedule
from irkit.utils import atomic_path, atomic_write_json, resolve_device

log = logging.getLogger(__name__)

RECIPE = "cvnet-rerank"
CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / f"{RECIPE}.yaml"


# ------------------------------------------------------------------------------------------ config
@dataclass
class RerankModelConfig:
    preset: str = "effnetlite2-cvnet"   # any preset with a stride-16 rerank_map and a `reranker`
    weights: str | None = None          # None: the preset's default weights (re-ranker from scratch)
    options: dict = field(default_factory=dict)


@dataclass
class RerankDataConfig:
    kind: str = "photos"                # photos | folder | gldv2
    path: str = "auto"                  # photo folder ("auto" = installed photo sources) / class folder / CSV
    image_root: str = ""                # gldv2 image root
    photo_sources: list[str] = field(default_factory=lambda: ["auto"])
    exclude: list[str] = field(default_factory=list)   # names/globs left out of the pool
    views_per_photo: int = 24           # photos: cached views per photo
    views_per_image: int = 1            # folder/gldv2: 1 = the image itself, more = + random views
    view_size: list[int] = field(default_factory=lambda: [288, 352])   # (h, w) of every cached view
    source_side: int = 512              # photos are resized to this larger side before taking views
    night_prob: float = 0.25            # share of views darkened and colour-cast ("night")
    crop_frac: list[float] = field(default_factory=lambda: [0.45, 0.9])
    max_rotation_deg: float = 15.0
    max_perspective: float = 0.15
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 10.0
    occlusion_prob: float = 0.5
    val_classes: int = 3                # photos/classes held out for validation (0 = none)
    max_classes: int | None = None
    extract_batch: int = 16


@dataclass
class MiningConfig:
    num_hard: int = 10                  # hard negatives kept per query (top-k by global similarity)
    remine_every: int = 200             # steps between re-mining
    pool_fraction: float = 0.5          # share of the training bank each re-mining draws its pool from


@dataclass
class HideConfig:
    grid: int = 4
    fill: str = "zero"                  # zero | mean (see irkit.train.hide_and_seek)
    side: str = "both"                  # both | key | query: which map of a pair is hidden


@dataclass
class RerankOptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    clip_grad: float = 5.0


@dataclass
class RerankConfig:
    recipe: str = RECIPE
    out_dir: str = "runs/cvnet-rerank"
    steps: int = 2000
    batch_pairs: int = 16
    pos_fraction: float = 0.5
    seed: int = 0
    threads: int = 0                    # torch CPU threads (0 = leave as is)
    device: str = "cpu"                 # cpu | cuda | auto
    log_every: int = 10
    val_every: int = 250
    ckpt_every: int = 250
    keep_checkpoints: int = 2
    max_minutes: float = 0.0            # stop (with a checkpoint) after this wall time; 0 = no limit
    progress: bool = True
    model: RerankModelConfig = field(default_factory=RerankModelConfig)
    data: RerankDataConfig = field(default_factory=RerankDataConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    hide: HideConfig = field(default_factory=HideConfig)
    optim: RerankOptimConfig = field(default_factory=RerankOptimConfig)
    # Schedule fields per value; end_step -1 = the last step
    curriculum: dict = field(default_factory=lambda: {
        "hard_negative_share": {"start_value": 0.0, "end_value": 0.8, "start_step": 0, "end_step": -1,
                                "kind": "linear"},
        "hide_prob": {"start_value": 0.0, "end_value": 0.3, "start_step": 0, "end_step": -1, "kind": "linear"},
    })


def make_rerank_config(overrides: Sequence[str] = (), config_file: str | os.PathLike | None = None) -> RerankConfig:
    """Defaults (``irkit/configs/cvnet-rerank.yaml``) <- ``config_file`` <- ``key=value`` overrides."""
    data: dict[str, Any] = load_yaml(CONFIG_PATH) if CONFIG_PATH.is_file() else {}
    if config_file:
        data = merge_dicts(data, load_yaml(config_file))
    data["recipe"] = RECIPE
    cfg = apply_overrides(from_dict(RerankConfig, data), list(overrides))
    validate(cfg)
    return cfg


def validate(cfg: RerankConfig) -> None:
    errs = []
    if cfg.steps < 1:
        errs.append(f"steps must be >= 1 (got {cfg.steps})")
    if cfg.batch_pairs < 1:
        errs.append(f"batch_pairs must be >= 1 (got {cfg.batch_pairs})")
    if not 0.0 <= cfg.pos_fraction <= 1.0:
        errs.append(f"pos_fraction must be in [0, 1] (got {cfg.pos_fraction})")
    if cfg.data.kind not in ("photos", "folder", "gldv2"):
        errs.append(f"data.kind must be photos, folder or gldv2 (got {cfg.data.kind!r})")
    if len(cfg.data.view_size) != 2 or min(cfg.data.view_size) < 32:
        errs.append(f"data.view_size must be [h, w], each >= 32 (got {cfg.data.view_size})")
    if cfg.hide.side not in ("both", "key", "query"):
        errs.append(f"hide.side must be both, key or query (got {cfg.hide.side!r})")
    if cfg.mining.num_hard < 1 or cfg.mining.remine_every < 1 or not 0 < cfg.mining.pool_fraction <= 1:
        errs.append("mining needs num_hard >= 1, remine_every >= 1 and 0 < pool_fraction <= 1")
    try:
        curriculum(cfg)
    except ConfigError as exc:
        errs.append(str(exc))
    if errs:
        raise ConfigError("invalid cvnet-rerank config: " + "; ".join(errs))


def curriculum(cfg: RerankConfig) -> RerankCurriculum:
    """The curriculum of ``cfg`` (``end_step: -1`` means the last step)."""
    out = {}
    for name in ("hard_negative_share", "hide_prob"):
        spec = dict(cfg.curriculum.get(name, {}))
        if spec.get("end_step", -1) in (-1, None):
            spec["end_step"] = cfg.steps
        try:
            out[name] = Schedule(**spec)
        except TypeError as exc:
            raise ConfigError(f"curriculum.{name}: {exc}") from exc
    unknown = set(cfg.curriculum) - set(out)
    if unknown:
        raise ConfigError(f"unknown curriculum entries {sorted(unknown)}; use hard_negative_share, hide_prob")
    return RerankCurriculum(**out)


# ------------------------------------------------------------------------------------ the map bank
@dataclass
class MapBank:
    """Cached backbone outputs: ``maps [N, C, h, w]`` (float16), ``descs [N, D]`` (L2 global
    descriptors of the same views), ``labels [N]`` (equal = same instance), ``names`` (source of
    each row) and ``val`` (bool [N], rows of held-out classes)."""

    maps: Tensor
    descs: Tensor
    labels: Tensor
    names: list[str]
    val: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({"maps": self.maps.contiguous(), "descs": self.descs.contiguous(),
                       "labels": self.labels.contiguous(), "val": self.val.to(torch.uint8).contiguous()},
                      str(tmp), metadata={"names": json.dumps(self.names)})

    @classmethod
    def load(cls, path: Path) -> "MapBank":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            names = json.loads(fh.metadata()["names"])
            t = {k: fh.get_tensor(k) for k in fh.keys()}
        return cls(t["maps"], t["descs"], t["labels"], names, t["val"].bool())


def night(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A crude "night" version of a view: gamma darkening, a warm or blue colour cast and sensor
    noise (synthetic views otherwise never show the illumination changes of day/night pairs)."""
    x = img.astype(np.float32) / 255.0
    x = np.power(x, rng.uniform(1.6, 3.0)) * rng.uniform(0.5, 1.0)
    cast = np.array([1.15, 1.0, 0.75]) if rng.random() < 0.5 else np.array([0.8, 0.9, 1.15])
    x = x * cast[None, None, :].astype(np.float32)
    x = x + rng.normal(0.0, rng.uniform(0.005, 0.03), size=x.shape).astype(np.float32)
    return np.clip(x * 255.0, 0, 255).astype(np.uint8)


def _view_config(d: RerankDataConfig):
    from irkit.data.synthetic_pairs import ViewConfig

    return ViewConfig(out_size=(int(d.view_size[0]), int(d.view_size[1])), crop_frac=tuple(d.crop_frac),
                      max_rotation_deg=d.max_rotation_deg, max_perspective=d.max_perspective,
                      brightness=d.brightness, contrast=d.contrast, saturation=d.saturation, hue=d.hue,
                      occlusion_prob=d.occlusion_prob)


def _sources(cfg: RerankConfig) -> tuple[list[Path], np.ndarray, int]:
    """(image paths, class label per path, views per path) of the configured data."""
    d = cfg.data
    if d.kind == "photos":
        from irkit.data.photo_sources import locate_photo_pool
        from irkit.data.synthetic_pairs import photo_pool

        if d.path in ("", "auto"):
            srcs = "auto" if list(d.photo_sources) in (["auto"], []) else list(d.photo_sources)
            paths = locate_photo_pool(srcs, exclude=d.exclude)
        else:
            paths = photo_pool(d.path, exclude=d.exclude)
        if d.max_classes:
            paths = paths[: d.max_classes]
        return list(paths), np.arange(len(paths)), max(2, d.views_per_photo)
    from irkit.data.training import folder_per_class, gldv2_clean

    data = folder_per_class(d.path) if d.kind == "folder" else gldv2_clean(d.path, d.image_root, min_images=2,
                                                                           max_classes=d.max_classes)
    labels = np.asarray(data.labels)
    if d.kind == "folder" and d.max_classes:
        keep = labels < d.max_classes
        return [p for p, k in zip(data.paths, keep) if k], labels[keep], max(1, d.views_per_image)
    return list(data.paths), labels, max(1, d.views_per_image)


def _make_views(img: np.ndarray, n: int, cfg: RerankConfig, rng: np.random.Generator, plain_first: bool
                ) -> list[np.ndarray]:
    from irkit.data.synthetic_pairs import random_view

    h, w = (int(s) for s in cfg.data.view_size)
    vcfg = _view_config(cfg.data)
    out = []
    for j in range(n):
        if j == 0 and plain_first:
            interp = cv2.INTER_AREA if img.shape[0] * img.shape[1] > h * w else cv2.INTER_LINEAR
            v = cv2.resize(img, (w, h), interpolation=interp)
        else:
            v = random_view(img, rng, vcfg).image
            if rng.random() < cfg.data.night_prob:
                v = night(v, rng)
        out.append(np.ascontiguousarray(v))
    return out


@torch.no_grad()
def build_bank(model: nn.Module, cfg: RerankConfig, progress: bool = True) -> MapBank:
    """Generate the views and run the frozen backbone over them once (maps + global descriptors)."""
    from irkit.io.images import load_image, resize_max_side, to_tensor

    paths, labels, n_views = _sources(cfg)
    classes = np.unique(labels)
    if len(classes) < 3:
        raise DatasetError(f"cvnet-rerank needs at least 3 classes/photos, found {len(classes)}")
    rng = np.random.default_rng([cfg.seed, 7919])
    n_val = min(cfg.data.val_classes, len(classes) - 2)
    val_classes = set(rng.permutation(classes)[:n_val].tolist()) if n_val > 0 else set()
    maps, descs, labs, names, val = [], [], [], [], []
    pending: list[tuple[np.ndarray, int, str]] = []
    dev = next(model.parameters()).device

    def flush() -> None:
        if not pending:
            return
        x = torch.stack([to_tensor(v, model.input_spec) for v, _, _ in pending]).to(dev)
        dsc, fmap = model.embed_and_map(x)
        maps.append(fmap.cpu().half())
        descs.append(dsc.float().cpu())
        for _, lab, name in pending:
            labs.append(lab)
            names.append(name)
            val.append(lab in val_classes)
        pending.clear()

    for path, lab in tqdm(list(zip(paths, labels.tolist())), desc="bank", unit="img", disable=not progress):
        img = load_image(path)
        if cfg.data.kind == "photos":
            img = resize_max_side(img, cfg.data.source_side)
        g = np.random.default_rng([cfg.seed, int(lab), len(names) + len(pending)])
        for v in _make_views(img, n_views, cfg, g, plain_first=cfg.data.kind != "photos"):
            pending.append((v, int(lab), Path(path).name))
            if len(pending) >= cfg.data.extract_batch:
                flush()
    flush()
    bank = MapBank(torch.cat(maps), torch.cat(descs), torch.as_tensor(labs, dtype=torch.long), names,
                   torch.as_tensor(val, dtype=torch.bool))
    log.info("map bank: %d views of %d classes (%d held out for validation), maps %s", len(bank),
             len(classes), len(val_classes), tuple(bank.maps.shape[1:]))
    return bank


# ----------------------------------------------------------------------------------- pair sampling
class PairSampler:
    """Draws (query, key, label) pairs from the training rows of a bank.

    Positives: another row of the query's class. Negatives: with probability ``hard_share`` one of
    the query's mined hard negatives (:meth:`remine`), else a uniformly drawn row of another class.
    """

    def __init__(self, bank: MapBank, rows: Tensor, num_hard: int = 10, pool_fraction: float = 0.5) -> None:
        self.bank = bank
        self.rows = rows.long()
        self.labels = bank.labels[self.rows]
        self.num_hard = int(num_hard)
        self.pool_fraction = float(pool_fraction)
        self.by_class: dict[int, np.ndarray] = {}
        for r, lab in zip(self.rows.tolist(), self.labels.tolist()):
            self.by_class.setdefault(lab, []).append(r)  # type: ignore[arg-type]
        self.by_class = {k: np.asarray(v) for k, v in self.by_class.items()}
        self.queries = np.asarray([r for r, lab in zip(self.rows.tolist(), self.labels.tolist())
                                   if len(self.by_class[lab]) >= 2])
        if len(self.queries) == 0:
            raise DatasetError("no class has two training views/images: positives are impossible")
        self.hard: dict[int, np.ndarray] = {}

    def remine(self, step: int, seed: int) -> None:
        """Top-``num_hard`` non-matching rows by global similarity for every query, from a random
        pool of ``pool_fraction`` of the training rows (the whole set if the pool is too small)."""
        from irkit.train.miners import HardNegativeMiner

        rng = np.random.default_rng([seed, step, 104729])
        all_rows = self.rows.numpy()
        n_pool = max(1, int(round(self.pool_fraction * len(all_rows))))
        pool = np.sort(rng.choice(all_rows, size=n_pool, replace=False))
        for candidate in (pool, all_rows):
            k = min(self.num_hard, len(np.unique(self.bank.labels[candidate].numpy())) - 1)
            if k < 1:
                continue
            try:
                q = torch.as_tensor(self.queries)
                out = HardNegativeMiner(num_negatives=k).mine(self.bank.descs, self.bank.labels, q, q,
                                                             pool=torch.as_tensor(candidate))
                self.hard = {int(r[0]): r[2:].numpy() for r in out}
                return
            except DatasetError:
                continue
        raise DatasetError("hard-negative mining found too few non-matching classes")

    def sample(self, n: int, hard_share: float, pos_fraction: float, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(query rows, key rows, labels (1 same / 0 not), is_hard)`` for ``n`` pairs."""
        qs = rng.choice(self.queries, size=n, replace=len(self.queries) < n)
        n_pos = int(round(n * pos_fraction))
        keys = np.empty(n, np.int64)
        lab = np.zeros(n, np.int64)
        hard = np.zeros(n, bool)
        for i, q in enumerate(qs.tolist()):
            c = int(self.bank.labels[q])
            if i < n_pos:
                same = self.by_class[c]
                keys[i] = rng.choice(same[same != q])
                lab[i] = 1
            elif self.hard.get(q) is not None and rng.random() < hard_share:
                keys[i] = rng.choice(self.hard[q])
                hard[i] = True
            else:
                while True:
                    k = int(rng.choice(self.rows.numpy()))
                    if int(self.bank.labels[k]) != c:
                        break
                keys[i] = k
        return qs, keys, lab, hard


# ------------------------------------------------------------------------------------------- model
def prepare_model(cfg: RerankConfig, device: torch.device | str = "cpu") -> nn.Module:
    """Build the preset, check it has a stride-16 map and a re-ranker that fits it, freeze all but
    the re-ranker."""
    from irkit.models.registry import build_model

    model = build_model(cfg.model.preset, weights=cfg.model.weights, device=device, **cfg.model.options)
    rr = getattr(model, "reranker", None)
    if rr is None or not getattr(model, "has_rerank_map", False):
        raise ConfigError(f"preset {cfg.model.preset!r} has no CVNet re-ranker on a rerank_map; use e.g. "
                          "effnetlite2-cvnet, effnetlite0-cvnet or cvnet-r50")
    with torch.no_grad():
        c = int(model.rerank_map(torch.zeros(1, 3, 64, 64, device=device)).shape[1])
    expect = int(rr.conv2ds[0].in_channels)
    if c != expect:
        raise ConfigError(f"{cfg.model.preset}: rerank_map has {c} channels but the re-ranker expects {expect}")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in rr.parameters():
        p.requires_grad_(True)
    model.eval()
    return model


def pair_logits(reranker: nn.Module, qmaps: Tensor, kmaps: Tensor) -> Tensor:
    """2-way logits [B] of pairs of raw maps (same sizes within each side)."""
    return reranker.logits(reranker.prepare(qmaps), reranker.prepare(kmaps))


def _hide(x: Tensor, p: float, cfg: HideConfig, gen: torch.Generator) -> Tensor:
    from irkit.train.hide_and_seek import hide_and_seek

    if p <= 0:
        return x
    return hide_and_seek(x, p, cfg.grid, cfg.fill, generator=gen)[0]


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC: probability a positive scores above a negative (ties count half)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


# ------------------------------------------------------------------------------------------ trainer
class RerankTrainer:
    """The focused loop (see the module docstring): bank once, then steps on cached map pairs."""

    def __init__(self, cfg: RerankConfig) -> None:
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        self.model = prepare_model(cfg, self.device)
        self.reranker = self.model.reranker
        self.curriculum = curriculum(cfg)
        params = [p for p in self.reranker.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.bank: MapBank | None = None
        self.sampler: PairSampler | None = None
        self.val_pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # -- schedule -------------------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        if step < o.warmup_steps:
            return (step + 1) / max(1, o.warmup_steps)
        t = min(1.0, (step - o.warmup_steps) / max(1, self.cfg.steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    # -- data -----------------------------------------------------------------------------------------
    def bank_key(self) -> str:
        parts = {"preset": self.cfg.model.preset, "weights": getattr(self.model, "weights_id", ""),
                 "options": self.cfg.model.options, "data": to_dict(self.cfg.data), "seed": self.cfg.seed}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def load_data(self) -> MapBank:
        path = self.out / f"bank_{self.bank_key()}.safetensors"
        if path.is_file():
            self.bank = MapBank.load(path)
            log.info("map bank reused: %s (%d views)", path, len(self.bank))
        else:
            self.bank = build_bank(self.model, self.cfg, progress=self.cfg.progress)
            self.bank.save(path)
        train_rows = torch.nonzero(~self.bank.val).squeeze(1)
        self.sampler = PairSampler(self.bank, train_rows, self.cfg.mining.num_hard, self.cfg.mining.pool_fraction)
        self.val_pairs = self._val_pairs()
        return self.bank

    def _val_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Fixed pairs on the held-out classes: per held-out view one positive (another view of its
        class) and one negative (its most similar view of another class, by global descriptor)."""
        b = self.bank
        rows = torch.nonzero(b.val).squeeze(1).numpy()
        if len(rows) == 0:
            return None
        rng = np.random.default_rng([self.cfg.seed, 15485863])
        sims = (b.descs[rows] @ b.descs.T).numpy()
        qs, ks, ls = [], [], []
        for i, q in enumerate(rows.tolist()):
            same = np.flatnonzero(b.labels.numpy() == int(b.labels[q]))
            same = same[same != q]
            if len(same):
                qs.append(q), ks.append(int(rng.choice(same))), ls.append(1)
            s = sims[i].copy()
            s[b.labels.numpy() == int(b.labels[q])] = -np.inf
            qs.append(q), ks.append(int(np.argmax(s))), ls.append(0)
        return np.asarray(qs), np.asarray(ks), np.asarray(ls)

    def _maps(self, rows: np.ndarray) -> Tensor:
        return self.bank.maps[torch.as_tensor(rows)].to(self.device, torch.float32)

    # -- one step ---------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimiser step at ``self.step`` (pairs and hiding drawn from (seed, step))."""
        cfg, step = self.cfg, self.step
        if step % cfg.mining.remine_every == 0 or not self.sampler.hard:
            # mined at the last due step, so a resumed run sees the same hard negatives
            self.sampler.remine(step - step % cfg.mining.remine_every, cfg.seed)
        cur = self.curriculum.at(step)
        rng = np.random.default_rng([cfg.seed, step])
        qs, ks, lab, hard = self.sampler.sample(cfg.batch_pairs, cur["hard_negative_share"], cfg.pos_fraction, rng)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        q, k = self._maps(qs), self._maps(ks)
        if cfg.hide.side in ("both", "query"):
            q = _hide(q, cur["hide_prob"], cfg.hide, gen)
        if cfg.hide.side in ("both", "key"):
            k = _hide(k, cur["hide_prob"], cfg.hide, gen)
        self.reranker.train()
        logits = pair_logits(self.reranker, q, k)
        y = torch.as_tensor(lab, device=self.device)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad > 0:
            nn.utils.clip_grad_norm_([p for p in self.reranker.parameters() if p.requires_grad], cfg.optim.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        with torch.no_grad():
            prob = torch.softmax(logits.detach(), 1)[:, 1].cpu().numpy()
        neg = lab == 0
        return {"step": self.step, "loss": float(loss.detach()), "acc": float(((prob > 0.5) == (lab == 1)).mean()),
                "p_pos": float(prob[~neg].mean()) if (~neg).any() else float("nan"),
                "p_neg": float(prob[neg].mean()) if neg.any() else float("nan"),
                "p_hard_neg": float(prob[hard].mean()) if hard.any() else float("nan"),
                "hard_share": cur["hard_negative_share"], "hide_prob": cur["hide_prob"],
                "lr": float(self.optimizer.param_groups[0]["lr"])}

    @torch.no_grad()
    def validate(self, batch: int = 32) -> dict[str, float] | None:
        """Loss, accuracy, mean P(same) of positives / negatives and AUC on the held-out pairs."""
        if self.val_pairs is None:
            return None
        qs, ks, ls = self.val_pairs
        self.reranker.eval()
        logits = torch.cat([pair_logits(self.reranker, self._maps(qs[i:i + batch]), self._maps(ks[i:i + batch]))
                            for i in range(0, len(qs), batch)])
        y = torch.as_tensor(ls, device=logits.device)
        prob = torch.softmax(logits, 1)[:, 1].cpu().numpy()
        pos, neg = prob[ls == 1], prob[ls == 0]
        return {"step": self.step, "val_loss": float(F.cross_entropy(logits, y)),
                "val_acc": float(((prob > 0.5) == (ls == 1)).mean()), "val_p_pos": float(pos.mean()),
                "val_p_neg": float(neg.mean()), "val_auc": _auc(pos, neg)}

    # -- checkpoints ----------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def export_config(self) -> dict[str, Any]:
        photos = sorted(set(self.bank.names)) if self.bank is not None else []
        return {"preset": self.cfg.model.preset, "options": self.cfg.model.options, "recipe": RECIPE,
                "step": self.step, "backbone_weights": getattr(self.model, "weights_id", ""),
                "train_sources": photos, "config": to_dict(self.cfg)}

    def save_checkpoint(self) -> Path:
        """``checkpoints/step_N``, ``latest.json`` and the exported ``model.safetensors`` (written and
        published by irkit.train.checkpointing)."""
        from irkit.models.checkpoints import save_irkit_checkpoint

        with write_checkpoint(self.out, self.step, self.cfg.keep_checkpoints) as tmp:
            save_irkit_checkpoint(self.model, self.export_config(), tmp / "model.safetensors")
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, tmp / "train_state.pt")
            atomic_write_json(tmp / "config.json", to_dict(self.cfg))
        return self.ckpt_root / f"step_{self.step:07d}"

    def load_checkpoint(self) -> bool:
        """Restore the newest checkpoint of ``out_dir`` (re-ranker, optimiser, scheduler, step)."""
        from irkit.models.checkpoints import read_checkpoint

        folder = latest_checkpoint(self.out)
        if folder is None:
            return False
        saved = json.loads((folder / "config.json").read_text())
        if saved.get("recipe") != RECIPE or saved.get("model", {}).get("preset") != self.cfg.model.preset:
            raise ConfigError(f"{self.out} holds a run of {saved.get('recipe')!r}/{saved.get('model', {}).get('preset')!r}; "
                              f"cannot resume it as {RECIPE}/{self.cfg.model.preset}")
        state = read_checkpoint(folder / "model.safetensors")
        rr = {k[len("reranker."):]: v for k, v in state.items() if k.startswith("reranker.")}
        self.reranker.load_state_dict(rr, strict=True)
        extra = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.step = int(extra["step"])
        for name in ("metrics.csv", "val.csv"):
            truncate_csv(self.out / name, self.step)
        log.info("resumed %s at step %d", folder, self.step)
        return True

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        t0 = time.time()
        if resume:
            if not self.load_checkpoint():
                log.warning("--resume: no checkpoint in %s, starting from step 0", self.out)
        else:
            for name in ("metrics.csv", "val.csv", "latest.json"):
                (self.out / name).unlink(missing_ok=True)
        self.load_data()
        bank_s = time.time() - t0
        cfg = self.cfg
        start = self.step
        window: list[dict[str, float]] = []
        last_val = None
        bar = tqdm(total=cfg.steps, initial=start, desc=RECIPE, unit="step", disable=not cfg.progress)
        stopped_early = False
        while self.step < cfg.steps:
            row = self.train_step()
            window.append(row)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                avg = {k: _finite_mean([r[k] for r in window]) if k != "step" else row[k] for k in row}
                avg["elapsed_s"] = round(time.time() - t0, 1)
                append_csv(self.out / "metrics.csv", avg)
                bar.set_postfix(loss=f"{avg['loss']:.3f}", acc=f"{avg['acc']:.2f}", hard=f"{avg['hard_share']:.2f}")
                window.clear()
            if cfg.val_every and self.step % cfg.val_every == 0:
                last_val = self.validate()
                if last_val:
                    append_csv(self.out / "val.csv", last_val)
                    log.info("step %d validation: %s", self.step, {k: round(v, 4) for k, v in last_val.items()})
            if cfg.max_minutes > 0 and time.time() - t0 > cfg.max_minutes * 60:
                log.warning("max_minutes=%s reached at step %d; stopping with a checkpoint", cfg.max_minutes, self.step)
                stopped_early = True
                break
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        bar.close()
        if last_val is None or last_val["step"] != self.step:
            last_val = self.validate()
            if last_val:
                append_csv(self.out / "val.csv", last_val)
        path = self.save_checkpoint()
        return {"recipe": RECIPE, "steps": self.step, "started_at": start, "stopped_early": stopped_early,
                "bank_views": len(self.bank), "bank_seconds": round(bank_s, 1),
                "seconds": round(time.time() - t0, 1), "checkpoint": str(path),
                "model": str(self.out / "model.safetensors"), "validation": last_val,
                "train_sources": sorted(set(self.bank.names))}


def _finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (nan when there are none, e.g. no hard negative in a window)."""
    v = [x for x in values if math.isfinite(x)]
    return float(sum(v) / len(v)) if v else float("nan")


def train_rerank(overrides: Sequence[str] = (), resume: bool = False,
                 config_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build the config and train (``irkit train cvnet-rerank key=value ...`` calls this)."""
    return RerankTrainer(make_rerank_config(overrides, config_file)).fit(resume=resume)


def config_dict(overrides: Sequence[str] = (), config_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """The resolved config as a plain dict (``--print-config``)."""
    return to_dict(make_rerank_config(overrides, config_file))


__all__ = ["RerankConfig", "make_rerank_config", "MapBank", "build_bank", "PairSampler", "RerankTrainer",
           "train_rerank", "prepare_model", "pair_logits", "curriculum", "night"]

"""The training loop: typed config, data, optimiser + schedule, AMP, DDP, checkpoints, resume, eval.

Why it is built this way:

* **Resume is exact.** A batch is a pure function of (seed, step) (:class:`BalancedBatches`), and a
  checkpoint holds the complete recipe module (model + heads + queue + EMA encoder), optimiser,
  scheduler, AMP scaler, step and RNG states. Resuming at step k therefore continues the same run:
  on a deterministic CPU it ends with bit-identical parameters (tests/test_trainer.py checks it).
* **Checkpoints are atomic.** Each is a directory ``checkpoints/step_XXXXXXX`` written under a
  temporary name and renamed; ``latest.json`` (atomic) names the newest. Weights are safetensors
  with a JSON config; optimiser/scheduler/RNG state is a weights-only-loadable ``torch.save``
  file (no pickled objects). ``model.safetensors`` + ``model.json`` at the top of ``out_dir`` is
  the exported inference model: ``build_model(json["preset"], weights=..., **json["options"])``.
* **One loop for every recipe.** What differs between methods lives in the recipe
  (:mod:`irkit.train.recipes`: its data, batches, loss, validation, export); the loop, optimiser,
  schedule, AMP, DDP, checkpoints and metrics are here, once.
* **The learning curve is visible.** ``metrics.csv`` (train loss per ``log_every`` steps),
  ``eval.csv`` (recipe validation and revisitop mAP per evaluation) and ``learning_curve.png``
  (both, redrawn at every checkpoint) sit next to ``model.safetensors``.
* **Library hygiene.** No prints (logging + tqdm), user mistakes raise ConfigError.

Config: :class:`TrainConfig` (dataclasses), from the recipe's YAML in ``irkit/configs`` plus an
optional user YAML plus ``key=value`` / ``KEY VALUE`` overrides (:func:`make_config`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from safetensors.torch import load_file, save_file

from irkit.config import apply_overrides, from_dict, load_yaml, merge_dicts, to_dict
from irkit.data.revisitop import load_revisitop
from irkit.data.training import BalancedBatches, collate
from irkit.errors import CheckpointError, ConfigError
from irkit.eval.revisitop import evaluate_ranks, ranks_from_scores
from irkit.extract import embed_arrays
from irkit.io.images import crop_bbx, load_image, resize_max_side
from irkit.models.checkpoints import save_irkit_checkpoint
from irkit.models.registry import build_model, get_preset
from irkit.train import distributed as D
from irkit.train.checkpointing import append_csv, latest_checkpoint, truncate_csv, write_checkpoint
from irkit.train.curves import plot_learning_curve
from irkit.train.data_kinds import data_kind_names
from irkit.train.registry import get_recipe
from irkit.utils import atomic_write_json, resolve_device

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# ------------------------------------------------------------------------------------------ config
@dataclass
class ModelConfig:
    preset: str = "effnetlite0-gem"
    weights: str | None = None          # checkpoint to start from; None = the preset's default weights
    pretrained: bool = True             # False: random initialisation even when the preset has weights
    options: dict = field(default_factory=dict)   # preset build options, e.g. {dim: 512}
    feature_module: str = "pool"        # module whose input is the last conv map
    bn: str = "auto"                    # "train" | "frozen" | "auto" (frozen when starting from weights)
    regions: str = "grid"               # rmac-triplet: "grid" (Tolias) | "proposals" (learned)
    rmac_levels: int = 3
    proposals_top_n: int = 8
    anchor_sizes: list[float] = field(default_factory=lambda: [2.0, 4.0, 6.0])
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])


@dataclass
class ViewsConfig:
    """Random views cached by cvnet-rerank's map bank (irkit.data.synthetic_pairs.random_view)."""
    per_photo: int = 24                 # label-free kinds: views per photo
    per_image: int = 1                  # labelled kinds: 1 = the image itself, more = + random views
    size: list[int] = field(default_factory=lambda: [288, 352])   # (h, w) of every view
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


@dataclass
class DataConfig:
    kind: str = "synthetic"   # a registered data kind (irkit.train.data_kinds): synthetic | scenes | gldv2 | ...
    path: str = ""            # CSV / pickle / class folder / photo folder ("" or "auto" for synthetic = photo_sources)
    image_root: str = ""      # image root for gldv2 / pairs / sfm120k
    exclude: list[str] = field(default_factory=list)   # photo names/globs to leave out (synthetic)
    photo_sources: list[str] = field(default_factory=lambda: ["auto"])
    num_scenes: int = 64      # kind=scenes: generated textured scenes
    image_size: int = 224
    batch_size: int = 16
    per_class: int = 2
    workers: int = 0
    max_classes: int | None = None
    min_images: int = 1
    split: str = "train"      # sfm120k split
    val_classes: int = 0      # classes held out for validation (drawn with the seed); every recipe
    val_class_names: list[str] = field(default_factory=list)   # or these classes (overrides val_classes)
    val_max_side: int = 320   # image recipes: validation images' larger side (one scale)
    val_distractors: int = 256   # image recipes: training images added to the validation database
    extract_batch: int = 16   # images per forward pass when caching maps (cvnet-rerank)
    cache_dir: str = ""       # where cached maps go ("" = out_dir)
    views: ViewsConfig = field(default_factory=ViewsConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"       # adamw | sgd
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    head_lr_mult: float = 10.0
    clip_grad: float = 5.0    # max gradient norm; <= 0 disables


@dataclass
class ScheduleConfig:
    kind: str = "cosine"      # cosine | step | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01
    step_size: int = 1000
    gamma: float = 0.1


@dataclass
class LossConfig:
    scale: float = 30.0             # CurricularFace / CosFace scale
    margin: float = 0.15            # CurricularFace / CosFace margin
    momentum: float = 0.999         # momentum encoder
    queue_size: int = 8192
    contrast_scale: float = 30.0
    contrast_weight: float = 1.0
    madacos_a: float = 0.02
    stage2_step: int = -1           # cfcd: step at which the local triplet joins (-1 = stage 1 only)
    local_weight: float = 1.0
    local_negatives: int = 6
    cfcd_negatives: str = "confusion"  # cfcd: "confusion" (stage-1 classifier's mistakes) or "in-batch"
    local_margin: float = 0.1
    ratio: float = 0.9
    top_frac: float = 0.5
    triplet_margin: float = 0.1
    contrastive_margin: float = 0.7
    hard_negatives: int = 5
    rpn_weight: float = 1.0
    rpn_detach: bool = True         # proposal loss does not move the backbone
    joint_rank: str = "triplet"
    pos_fraction: float = 0.5       # cvnet-rerank: share of positive pairs per batch


@dataclass
class MiningConfig:
    num_hard: int = 10              # hard negatives kept per query (top-k by global similarity)
    remine_every: int = 200         # steps between re-mining
    pool_fraction: float = 0.5      # share of the training rows each re-mining draws its pool from


@dataclass
class HideConfig:
    grid: int = 4                   # Hide-and-Seek grid (cells per side)
    fill: str = "zero"              # zero | mean (see irkit.train.hide_and_seek)
    side: str = "both"              # both | key | query: which map of a pair is hidden


def _default_curriculum() -> dict:
    return {"hard_negative_share": {"start_value": 0.0, "end_value": 0.8, "start_step": 0, "end_step": -1,
                                    "kind": "linear"},
            "hide_prob": {"start_value": 0.0, "end_value": 0.3, "start_step": 0, "end_step": -1, "kind": "linear"}}


@dataclass
class EvalConfig:
    data_dir: str = ""              # revisitop-layout folder holding <name>/gnd_<name>.pkl
    name: str = "minidev"
    every: int = 0                  # steps between evaluations (0 = only at the end)
    at_start: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])
    max_side: int | None = None     # None: the model's own input convention
    select: str = "auto"            # validation metric that picks best.safetensors ("auto": the recipe's,
                                    # val_map for image recipes, val_auc for cvnet-rerank; "" = none)
    patience: int = 0               # stop after this many evaluations without a better `select` (0 = never)
    rerank_lambdas: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0])
    rerank_topks: list[int] = field(default_factory=lambda: [10, 25, 50, 100])
    rerank_queries: int = 40        # cvnet-rerank: held-out views that query the bank to choose λ / top-k
    rerank_min_gain: float = 0.5    # λ stays 0 unless re-ranking gains this many validation mAP points


@dataclass
class TrainConfig:
    recipe: str = "gem-contrastive"
    out_dir: str = "runs/train"
    steps: int = 1000
    seed: int = 0
    device: str = "auto"
    amp: bool = True                # mixed precision (CUDA only; ignored on CPU)
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    progress: bool = True
    deterministic: bool = False
    max_minutes: float = 0.0        # stop (with a checkpoint) after this wall time; 0 = no limit
    threads: int = 0                # torch CPU threads (0 = leave as is)
    plot: bool = True               # write learning_curve.png next to the checkpoint
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    hide: HideConfig = field(default_factory=HideConfig)
    curriculum: dict = field(default_factory=_default_curriculum)   # Schedule fields; end_step -1 = last step


def make_config(recipe: str, overrides: Sequence[str] = (), config_file: str | os.PathLike | None = None
                ) -> TrainConfig:
    """Recipe defaults (``irkit/configs/<recipe>.yaml``) <- ``config_file`` <- ``overrides``."""
    get_recipe(recipe)
    data: dict[str, Any] = {}
    path = CONFIG_DIR / f"{recipe}.yaml"
    if path.is_file():
        data = load_yaml(path)
    if config_file:
        data = merge_dicts(data, load_yaml(config_file))
    data["recipe"] = recipe
    cfg = from_dict(TrainConfig, data)
    cfg = apply_overrides(cfg, list(overrides))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    errs = []
    if cfg.steps < 1:
        errs.append(f"steps must be >= 1 (got {cfg.steps})")
    if cfg.data.batch_size < 2 or cfg.data.batch_size % cfg.data.per_class:
        errs.append(f"data.batch_size ({cfg.data.batch_size}) must be >= 2 and a multiple of data.per_class "
                    f"({cfg.data.per_class})")
    if cfg.optim.name not in ("adamw", "sgd"):
        errs.append(f"optim.name must be adamw or sgd (got {cfg.optim.name!r})")
    if cfg.schedule.kind not in ("cosine", "step", "constant"):
        errs.append(f"schedule.kind must be cosine, step or constant (got {cfg.schedule.kind!r})")
    if cfg.model.bn not in ("auto", "train", "frozen"):
        errs.append(f"model.bn must be auto, train or frozen (got {cfg.model.bn!r})")
    if cfg.data.kind not in data_kind_names():
        errs.append(f"data.kind must be one of {', '.join(data_kind_names())} (got {cfg.data.kind!r})")
    if cfg.data.image_size < 16:
        errs.append(f"data.image_size must be >= 16 (got {cfg.data.image_size})")
    errs += get_recipe(cfg.recipe).check_config(cfg)
    if errs:
        raise ConfigError("invalid training config: " + "; ".join(errs))


# ---------------------------------------------------------------------------------------- building
def build_base_model(cfg: TrainConfig) -> nn.Module:
    """The preset with its starting weights (``model.weights``, else the preset default unless
    ``model.pretrained=false``)."""
    preset = get_preset(cfg.model.preset)
    if cfg.model.weights:
        return build_model(cfg.model.preset, weights=cfg.model.weights, device="cpu", **cfg.model.options)
    if cfg.model.pretrained and preset.default_weights is not None and preset.default_weights() is not None:
        return build_model(cfg.model.preset, device="cpu", **cfg.model.options)
    model = preset.build(**cfg.model.options)
    model.preset_name = cfg.model.preset
    model.weights_id = "random"
    return model


def starts_pretrained(cfg: TrainConfig) -> bool:
    if cfg.model.weights:
        return True
    preset = get_preset(cfg.model.preset)
    return bool(cfg.model.pretrained and preset.default_weights is not None and preset.default_weights() is not None)


def _lr_lambda(sc: ScheduleConfig, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if sc.warmup_steps > 0 and step < sc.warmup_steps:
            return (step + 1) / sc.warmup_steps
        if sc.kind == "constant":
            return 1.0
        if sc.kind == "step":
            return sc.gamma ** ((step - sc.warmup_steps) // max(1, sc.step_size))
        span = max(1, total - sc.warmup_steps)
        t = min(1.0, (step - sc.warmup_steps) / span)
        return sc.min_lr_ratio + (1 - sc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------- trainer
class Trainer:
    """Runs one training config, whatever the recipe. ``on_step(trainer, step)`` is called after
    every optimiser step (tests use it to interrupt a run)."""

    def __init__(self, cfg: TrainConfig, on_step: Callable[["Trainer", int], None] | None = None) -> None:
        self.cfg = cfg
        self.on_step = on_step
        self.rank, self.world, local = D.init_from_env()
        self.is_main = self.rank == 0
        if self.world > 1 and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{local}")
        else:
            self.device = resolve_device(cfg.device)
        self.amp = bool(cfg.amp and self.device.type == "cuda")
        self.out = Path(cfg.out_dir)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        recipe_cls = get_recipe(cfg.recipe)
        base = build_base_model(cfg)
        self.pretrained = starts_pretrained(cfg)
        self.data = recipe_cls.build_data(cfg, base.input_spec)
        self.dataset, self.labels, self.num_classes = self.data.dataset, self.data.labels, self.data.num_classes
        log.info("training data: %s", self.data.description)
        self.recipe = recipe_cls(base, cfg, self.num_classes).to(self.device)
        self.bn_frozen = cfg.model.bn == "frozen" or (cfg.model.bn == "auto" and self.pretrained)
        self.module: nn.Module = self.recipe
        if self.world > 1:
            self.module = nn.parallel.DistributedDataParallel(
                self.recipe, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self._train_mode()
        head = self.recipe.head_parameters()
        head_ids = {id(p) for p in head}
        body = [p for p in self.recipe.parameters() if p.requires_grad and id(p) not in head_ids]
        O = cfg.optim
        groups = [{"params": body, "lr": O.lr}, {"params": head, "lr": O.lr * O.head_lr_mult}]
        groups = [g for g in groups if g["params"]]
        if O.name == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=O.lr, momentum=O.momentum, weight_decay=O.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=O.lr, weight_decay=O.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg.schedule, cfg.steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.step = 0
        self._eval_cache: dict[str, Any] | None = None
        self.select_metric = self.recipe.select_metric if cfg.eval.select == "auto" else cfg.eval.select
        self.best: dict[str, Any] = {}     # {"metric", "value", "step"} of best.safetensors
        self._stale = 0                     # evaluations since the best one

    # ---------------------------------------------------------------- helpers
    def _train_mode(self) -> None:
        self.recipe.train()
        if self.bn_frozen:
            self.recipe.freeze_bn()

    def image_batches(self, start: int):
        """Class-balanced image batches for steps ``start …`` (a pure function of (seed, step))."""
        D_ = self.cfg.data
        if (D_.batch_size // self.world) % D_.per_class:
            raise ConfigError(f"data.batch_size / world size ({D_.batch_size}/{self.world}) must be a multiple "
                              f"of data.per_class ({D_.per_class}) so every rank has whole groups")
        sampler = BalancedBatches(self.labels, D_.batch_size, D_.per_class, seed=self.cfg.seed, start_step=start,
                                  total_steps=self.cfg.steps, shard=(self.rank, self.world))
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                                           num_workers=D_.workers, persistent_workers=False,
                                           pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------- checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def export_config(self) -> dict[str, Any]:
        return {"preset": self.cfg.model.preset, "options": dict(self.cfg.model.options),
                "recipe": self.cfg.recipe, "step": self.step, "train_config": to_dict(self.cfg),
                **self.recipe.export_config()}

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically, update ``latest.json``, export the inference model
        to ``out_dir/model.safetensors``, prune old checkpoints (irkit.train.checkpointing), redraw
        the learning curve."""
        with write_checkpoint(self.out, self.step, self.cfg.keep_checkpoints) as tmp:
            save_irkit_checkpoint(self.recipe.export(), self.export_config(), tmp / "model.safetensors")
            state = {k: v.detach().cpu().contiguous().clone() for k, v in self.recipe.state_dict().items()}
            save_file(state, str(tmp / "train.safetensors"))
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                        "rng": _rng_state()}, tmp / "train_state.pt")
            atomic_write_json(tmp / "config.json", to_dict(self.cfg))
        self.plot()
        return self.ckpt_root / f"step_{self.step:07d}"

    def plot(self) -> Path | None:
        """Redraw ``learning_curve.png`` from the metrics CSVs (``plot=false`` turns it off)."""
        if not (self.cfg.plot and self.is_main):
            return None
        return plot_learning_curve(self.out, title=f"{self.cfg.recipe} ({self.out.name})")

    def load_checkpoint(self) -> bool:
        """Restore the newest checkpoint of ``out_dir``; False when there is none."""
        folder = latest_checkpoint(self.out)
        if folder is None:
            return False
        saved = json.loads((folder / "config.json").read_text())
        if saved.get("recipe") != self.cfg.recipe:
            raise ConfigError(f"{self.out} holds a {saved.get('recipe')!r} run; cannot resume it as "
                              f"{self.cfg.recipe!r}")
        state = load_file(str(folder / "train.safetensors"))
        missing, unexpected = self.recipe.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{folder}: training state does not match this config "
                                  f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        extra = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.scaler.load_state_dict(extra["scaler"])
        _set_rng_state(extra["rng"])
        self.step = int(extra["step"])
        if (self.out / "best.json").is_file():                   # the best evaluation so far
            self.best = json.loads((self.out / "best.json").read_text()).get("best", {})
        log.info("resumed %s at step %d", folder, self.step)
        return True

    # ----------------------------------------------------------------- metrics
    def _log_csv(self, name: str, row: dict[str, Any]) -> None:
        append_csv(self.out / name, row)

    # ---------------------------------------------------------------- evaluate
    def evaluate(self) -> dict[str, float] | None:
        """mAP (E/M/H) of the current model on ``eval.name`` under ``eval.data_dir``."""
        E = self.cfg.eval
        if not E.data_dir:
            return None
        res = evaluate_revisitop(self.recipe.export(), E.data_dir, E.name, E.scales, E.max_side,
                                 cache=self._eval_cache if self._eval_cache is not None else {})
        self._eval_cache = res.pop("_cache")
        self._train_mode()
        return res

    # --------------------------------------------------------------------- run
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``cfg.steps``; returns a summary (final loss, last evaluation, file paths)."""
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            if not self.load_checkpoint():
                log.warning("--resume: no checkpoint in %s, starting from step 0", self.out)
        elif (self.out / "latest.json").is_file():
            raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it or choose "
                              "another out_dir")
        if self.is_main:
            truncate_csv(self.out / "metrics.csv", self.step)
            truncate_csv(self.out / "eval.csv", self.step)
            atomic_write_json(self.out / "config.json", to_dict(cfg))
        t0 = time.time()
        self.recipe.setup(self)
        summary: dict[str, Any] = {"recipe": cfg.recipe, "start_step": self.step,
                                   "setup_seconds": round(time.time() - t0, 2)}
        if self.is_main and cfg.eval.at_start and self.step == 0:
            summary["eval_start"] = self._run_eval()
        self._train_mode()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.recipe}", unit="step",
                   disable=not (cfg.progress and self.is_main))
        t0 = time.time()
        last_loss = float("nan")
        last_eval: dict[str, Any] | None = None
        stopped_early = False
        for batch in self.recipe.batches(self, self.step):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            self.recipe.step = self.step
            self.recipe.before_step(self)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                loss, logs = self.module(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)} at step {self.step}; lower optim.lr or "
                                         "enable clipping (optim.clip_grad)")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            gnorm = float("nan")
            if cfg.optim.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                gnorm = float(torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], cfg.optim.clip_grad))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.recipe.after_step()
            self.step += 1
            last_loss = float(D.all_reduce_mean(loss.detach().float()))
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if self.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                row = {"step": self.step, "lr": self.optimizer.param_groups[0]["lr"], "loss": last_loss,
                       "grad_norm": gnorm, "seconds": round(time.time() - t0, 3)}
                row.update({k: v for k, v in logs.items()})
                self._log_csv("metrics.csv", row)
            timeout = cfg.max_minutes > 0 and (time.time() - t0) > cfg.max_minutes * 60
            if self.is_main and cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.steps:
                last_eval = self._run_eval()
                if cfg.eval.patience > 0 and self._stale >= cfg.eval.patience:
                    log.warning("no better validation %s in %d evaluations: early stop at step %d (best: step "
                                "%s)", self.select_metric, self._stale, self.step, self.best.get("step"))
                    timeout = True
            if self.is_main and (self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or timeout):
                summary["checkpoint"] = str(self.save_checkpoint())
            if self.on_step is not None:
                self.on_step(self, self.step)
            if timeout:
                log.warning("max_minutes=%.1f reached at step %d: stopping (resume with --resume)",
                            cfg.max_minutes, self.step)
                stopped_early = True
                break
        bar.close()
        if self.is_main:
            final = self._run_eval()
            if final is not None:
                last_eval = final
                summary["eval"] = final
            curve = self.plot()
            if self.best:
                summary["best"] = dict(self.best)
            summary.update(self.recipe.after_fit(self))
            summary["files"] = {"model": str(self.out / "model.safetensors"),
                                "best": str(self.out / "best.safetensors") if self.best else None,
                                "metrics": str(self.out / "metrics.csv"),
                                "eval": str(self.out / "eval.csv") if (self.out / "eval.csv").is_file() else None,
                                "learning_curve": str(curve) if curve else None}
        summary.update(step=self.step, loss=last_loss, seconds=round(time.time() - t0, 2),
                       stopped_early=stopped_early, **self.recipe.summary_extras())
        if last_eval is not None:
            summary["last_eval"] = last_eval
        return summary

    def _run_eval(self) -> dict[str, Any] | None:
        """Recipe validation + revisitop mAP at this step, appended to ``eval.csv`` (None: neither)."""
        row: dict[str, Any] = dict(self.recipe.validate(self))
        self._train_mode()
        res = self.evaluate()
        if res is not None:
            row.update({"dataset": self.cfg.eval.name, **res})
            log.info("eval %s at step %d: E %.2f M %.2f H %.2f", self.cfg.eval.name, self.step,
                     res["easy"], res["medium"], res["hard"])
        if not row:
            return None
        row = {"step": self.step, **row}
        self._keep_best(row)
        self._log_csv("eval.csv", row)
        log.info("evaluation at step %d: %s", self.step,
                 {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        return row


    def _keep_best(self, row: dict[str, Any]) -> None:
        """Export ``best.safetensors`` (+ ``best.json``) when the validation metric ``eval.select``
        beats every earlier evaluation of the run (ties keep the earlier, i.e. fewer steps)."""
        metric = self.select_metric
        value = row.get(metric) if metric else None
        if value is None or not math.isfinite(float(value)):
            return
        if self.best and float(value) <= float(self.best["value"]):
            self._stale += 1
            return
        self._stale = 0
        self.best = {"metric": metric, "value": float(value), "step": self.step}
        save_irkit_checkpoint(self.recipe.export(), {**self.export_config(), "best": self.best},
                              self.out / "best.safetensors")
        log.info("best %s %.4f at step %d -> %s", metric, float(value), self.step, self.out / "best.safetensors")


# ------------------------------------------------------------------------------------- evaluation
def evaluate_revisitop(model: nn.Module, data_dir: str | os.PathLike, name: str,
                       scales: Sequence[float] = (1.0,), max_side: int | None = None,
                       cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """mAP E/M/H (%) of ``model`` on a revisitop-layout dataset via irkit.extract + irkit.eval.

    Decoded images are kept in ``cache`` (returned under ``"_cache"``) so periodic evaluation
    decodes them once."""
    cache = cache if cache is not None else {}
    key = f"{data_dir}|{name}|{max_side}"
    if cache.get("key") != key:
        ds = load_revisitop(data_dir, name)

        def prep(img: np.ndarray) -> np.ndarray:
            return resize_max_side(img, max_side) if max_side else img

        queries = [prep(crop_bbx(load_image(p), b) if b is not None else load_image(p))
                   for p, b in zip(ds.query_paths, ds.query_bbx)]
        db = [prep(load_image(p)) for p in ds.db_paths]
        cache.clear()
        cache.update(key=key, ds=ds, queries=queries, db=db)
    ds = cache["ds"]
    was = model.training
    model.eval()
    q = embed_arrays(model, cache["queries"], scales)
    x = embed_arrays(model, cache["db"], scales)
    model.train(was)
    res = evaluate_ranks(ranks_from_scores(x @ q.T), ds.gnd)
    return {"easy": float(res["easy"]["map"]), "medium": float(res["medium"]["map"]),
            "hard": float(res["hard"]["map"]), "_cache": cache}


def train(recipe: str, overrides: Sequence[str] = (), resume: bool = False,
          config_file: str | os.PathLike | None = None,
          on_step: Callable[[Trainer, int], None] | None = None) -> dict[str, Any]:
    """Build the config, train, return the summary (the CLI and ``python -m irkit.train`` call this)."""
    cfg = make_config(recipe, overrides, config_file)
    try:
        summary = Trainer(cfg, on_step=on_step).fit(resume=resume)
    except BaseException:
        D.cleanup()
        raise
    D.cleanup(barrier=True)
    return summary

"""The recipe base class and the one registry of recipes (the CLI, the YAML configs and config
validation all read ``RECIPES`` through :mod:`irkit.train.registry`)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from irkit.export import set_runtime
from irkit.io.images import InputSpec
from irkit.models.base import GlobalModel
from irkit.train.data_kinds import TrainData, build_dataset

RECIPES: dict[str, type["Recipe"]] = {}


def register(name: str, summary: str) -> Callable[[type["Recipe"]], type["Recipe"]]:
    """Class decorator: the one registry of recipes (CLI, YAML configs and validation read it);
    ``irkit/configs/<name>.yaml`` holds the recipe's defaults."""
    def deco(cls: type["Recipe"]) -> type["Recipe"]:
        if name in RECIPES:
            raise ValueError(f"recipe {name!r} registered twice")
        RECIPES[name] = cls
        cls.name, cls.summary = name, summary
        return cls
    return deco


def freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm layers of ``module`` in eval mode with frozen affine parameters (fine-tuning from
    pretrained weights with small per-GPU batches)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


class Recipe(nn.Module):
    """Base: holds ``model`` (the GlobalModel being trained); subclasses add heads and the loss.

    The Trainer drives every recipe through the same hooks: ``build_data`` (classmethod) ->
    ``setup`` -> per step ``batches`` / ``before_step`` / ``forward`` / ``after_step`` ->
    ``validate`` at evaluation points -> ``export`` / ``export_config`` at checkpoints."""

    name = "base"
    summary = ""                   # one line for the CLI's help
    in_batch_positives = True      # needs data.per_class >= 2
    select_metric = "val_map"      # validation metric (higher = better) that picks best.safetensors

    def __init__(self, model: GlobalModel, cfg, num_classes: int) -> None:
        super().__init__()
        # Evaluations during training run the model in torch: its weights change every step, and an
        # onnxruntime session would need a fresh export (and a cache file) per evaluation.
        self.model = set_runtime(model, "torch")
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.step = 0  # set by the trainer before each forward (schedules inside recipes)

    # ----------------------------------------------------------------------- config and data
    @classmethod
    def check_config(cls, cfg) -> list[str]:
        """Recipe-specific config errors (empty when fine)."""
        if cls.in_batch_positives and cfg.data.per_class < 2:
            return [f"recipe {cls.name} needs in-batch positives: data.per_class >= 2"]
        return []

    @classmethod
    def build_data(cls, cfg, spec: InputSpec) -> TrainData:
        """The training data (default: image batches of ``data.kind``)."""
        return build_dataset(cfg, spec)

    def setup(self, trainer: Any) -> None:
        """Called once by ``fit`` after any checkpoint is restored, before the first step."""

    def batches(self, trainer: Any, start: int) -> Iterable[dict[str, Tensor]]:
        """Batches for steps ``start, start + 1, …`` (default: the trainer's class-balanced images)."""
        return trainer.image_batches(start)

    # ----------------------------------------------------------------------------- training
    def freeze_bn(self) -> None:
        """Applied after ``train()`` when BatchNorm is frozen (``model.bn``)."""
        freeze_batchnorm(self.model)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters that are not the model's (given the head learning-rate multiplier)."""
        own = {id(p) for p in self.model.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError

    def before_step(self, trainer: Any) -> None:
        """Called before every forward with the trainer (data-dependent set-up: CFCD's stage-1
        predictions over the training set)."""

    @torch.no_grad()
    def after_step(self) -> None:
        """Called after every optimiser step (EMA updates)."""

    def validate(self, trainer: Any) -> dict[str, float]:
        """Validation metrics at each evaluation point (logged to eval.csv). Default: when classes
        are held out (``data.val_classes`` / ``data.val_class_names``), ``val_map`` = mAP (%) of
        every held-out image querying the other held-out images plus ``data.val_distractors``
        training images (drawn with the seed; positives: its class), with the exported model at one
        scale, larger side ``data.val_max_side``. Without distractors a few held-out classes rank
        each other almost perfectly from the start (mAP 99+), and no checkpoint can look better."""
        data = getattr(trainer, "data", None)
        val = getattr(data, "val", None)
        if val is None or len(val) < 2:
            return {}
        from irkit.extract import embed_arrays
        from irkit.io.images import load_image, resize_max_side
        from irkit.train.select import labelled_map

        side, n_dis = int(self.cfg.data.val_max_side), max(0, int(self.cfg.data.val_distractors))
        key = (id(val), side, n_dis)
        if getattr(self, "_val_key", None) != key:
            train = data.source
            picks = np.random.default_rng([int(self.cfg.seed), 4099]).permutation(len(train))[:n_dis]
            paths = list(val.paths) + [train.paths[i] for i in sorted(picks.tolist())]
            self._val_images = [resize_max_side(load_image(p), side) for p in paths]
            self._val_key = key
        model = self.export()
        was = model.training
        model.eval()
        x = embed_arrays(model, self._val_images, [1.0])
        model.train(was)
        n = len(val)
        labels = np.concatenate([np.asarray(val.labels), np.full(len(x) - n, -1)])   # distractors: no label
        return {"val_map": labelled_map(x, labels, n), "val_images": float(n), "val_distractors": float(len(x) - n)}

    def after_fit(self, trainer: Any) -> dict[str, Any]:
        """Called once on the main process when training ends (after the final evaluation and
        best.safetensors); returns extra summary fields (cvnet-rerank: the λ / top-k choice)."""
        return {}

    # ------------------------------------------------------------------------------- export
    def export(self) -> GlobalModel:
        """The inference model to checkpoint and evaluate."""
        return self.model

    def export_config(self) -> dict[str, Any]:
        """Extra fields for the checkpoint JSON (``preset``/``options`` here override the config's,
        so that ``build_model(preset, weights=..., **options)`` rebuilds the exported model)."""
        return {}

    def summary_extras(self) -> dict[str, Any]:
        """Extra fields of the run summary."""
        return {}

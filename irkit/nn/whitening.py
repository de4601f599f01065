"""Whitening / dimensionality reduction of global descriptors.

Three ways to get the same object, an affine map ``y = P (x - mean)`` followed by L2
normalisation:

* learned end to end: :class:`Whitening` is a ``Linear`` (optional bias) trained with the network;
* PCA-whitening learned from a descriptor set (:func:`learn_pca_whitening`): centre, eigen-decompose
  the covariance, keep ``dims`` directions, scale each by eigenvalue^-``power`` (0.5 = whitening,
  0 = plain PCA rotation), with ``shrinkage`` added to the eigenvalues (relative to their mean) so
  tiny directions are not blown up;
* learned from matching pairs (:func:`learn_lw`, Radenović et al.'s "Lw"): whiten with the
  covariance of intra-pair differences (what varies between two views of one object is squashed),
  then rotate by the PCA of the whole whitened learning set (spread what separates objects).

Everything is stored as plain tensors in safetensors (``save_whitening``/``load_whitening``), never
as pickled objects, so a whitening file is portable and safe to load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from irkit.errors import CheckpointError, ConfigError


@dataclass
class WhiteningParams:
    """``y = projection @ (x - mean)``; ``eigenvalues`` of the last decomposition (diagnostics)."""

    mean: Tensor          # [D]
    projection: Tensor    # [d, D]
    eigenvalues: Tensor   # [d]
    kind: str = "pca"

    def apply(self, x: Tensor, normalize: bool = True) -> Tensor:
        return apply_whitening(x, self.mean, self.projection, normalize)


def apply_whitening(x: Tensor, mean: Tensor, projection: Tensor, normalize: bool = True) -> Tensor:
    """[N, D] -> [N, d]: project the centred descriptors, then L2-normalise (unless ``normalize=False``)."""
    y = (x - mean.to(x)) @ projection.to(x).t()
    return F.normalize(y, dim=-1) if normalize else y


def _eig_desc(cov: Tensor) -> tuple[Tensor, Tensor]:
    vals, vecs = torch.linalg.eigh((cov + cov.t()) / 2)
    order = torch.argsort(vals, descending=True)
    return vals[order].clamp(min=0), vecs[:, order]


def _scaled(vals: Tensor, power: float, shrinkage: float) -> Tensor:
    floor = vals.max().clamp(min=1e-30) * 1e-12
    return (vals + shrinkage * vals.mean() + floor).pow(-power)


def learn_pca_whitening(x: Tensor, dims: int | None = None, power: float = 0.5, shrinkage: float = 0.0,
                        center: bool = True) -> WhiteningParams:
    """PCA-whitening from descriptors ``x`` [N, D] (computed in float64, returned float32)."""
    x = torch.as_tensor(x).double()
    n, d = x.shape
    dims = d if dims is None else int(dims)
    if not 1 <= dims <= d:
        raise ValueError(f"dims must be in [1, {d}], got {dims}")
    mean = x.mean(0) if center else torch.zeros(d, dtype=x.dtype)
    xc = x - mean
    vals, vecs = _eig_desc(xc.t() @ xc / max(n - 1, 1))
    vals, vecs = vals[:dims], vecs[:, :dims]
    proj = _scaled(vals, power, shrinkage)[:, None] * vecs.t()
    return WhiteningParams(mean.float(), proj.float(), vals.float(), kind="pca")


def learn_lw(x: Tensor, query_idx: Tensor, positive_idx: Tensor, dims: int | None = None,
             shrinkage: float = 0.0) -> WhiteningParams:
    """Radenović et al.'s learned whitening "Lw" (TPAMI 2018; cirtorch ``whitenlearn(X, qidxs, pidxs)``).

    ``x`` [N, D]: every descriptor of the learning set (one row per image; cirtorch's X is its
    transpose); pair i is ``x[query_idx[i]]`` matching ``x[positive_idx[i]]``. Steps:

    1. mean m = mean of the query descriptors of the pairs, ``x[query_idx]``;
    2. whitening from the covariance of the pair differences, S = mean_i (q_i - p_i)(q_i - p_i)^T:
       P_w = S^-1/2 (any square root whitens; cirtorch's inverse Cholesky factor gives the same
       final projection, rows up to sign), eigenvalues raised by ``shrinkage`` x their mean;
    3. rotation R = eigenvectors of the covariance of ALL rows of ``x`` (queries, positives and
       any other image alike), centred at m and whitened by P_w, sorted by decreasing eigenvalue;
    4. projection = R[:, :dims]^T P_w, applied as ``projection @ (x - m)`` then L2.

    ``eigenvalues``: those of step 3 (variance of the whitened learning set per kept direction).
    """
    x = torch.as_tensor(x).double()
    qi = torch.as_tensor(query_idx, dtype=torch.long).reshape(-1)
    pi = torch.as_tensor(positive_idx, dtype=torch.long).reshape(-1)
    if x.dim() != 2:
        raise ConfigError(f"learn_lw needs descriptors [N, D], got shape {tuple(x.shape)}")
    n, d = x.shape
    if qi.numel() != pi.numel() or qi.numel() == 0:
        raise ConfigError(f"learn_lw needs as many query as positive indices (at least one pair), got "
                          f"{qi.numel()} and {pi.numel()}")
    for name, idx in (("query_idx", qi), ("positive_idx", pi)):
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ConfigError(f"learn_lw {name} must index rows of the {n} descriptors, got values in "
                              f"[{int(idx.min())}, {int(idx.max())}]")
    dims = d if dims is None else int(dims)
    if not 1 <= dims <= d:
        raise ConfigError(f"learn_lw dims must be in [1, {d}], got {dims}")
    mean = x[qi].mean(0)                                                    # 1. query mean
    diff = x[qi] - x[pi]
    vals_w, vecs_w = _eig_desc(diff.t() @ diff / diff.shape[0])             # 2. S of pair differences
    whiten = _scaled(vals_w, 0.5, shrinkage)[:, None] * vecs_w.t()          #    S^-1/2 (rotated)
    xw = (x - mean) @ whiten.t()                                            # 3. ALL rows, whitened
    vals_p, vecs_p = _eig_desc(xw.t() @ xw / n)
    proj = vecs_p[:, :dims].t() @ whiten                                    # 4. rotate, keep dims
    return WhiteningParams(mean.float(), proj.float(), vals_p[:dims].float(), kind="lw")


class Whitening(nn.Module):
    """Learned FC whitening: ``Linear(dim, out_dim, bias)`` then L2. Initialise from learned
    parameters with :meth:`from_params` (bias = -P mean; needs ``bias=True`` unless mean is 0)."""

    def __init__(self, dim: int, out_dim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, out_dim or dim, bias=bias)

    @classmethod
    def from_params(cls, params: WhiteningParams, bias: bool = True) -> "Whitening":
        out_dim, dim = params.projection.shape
        module = cls(dim, out_dim, bias=bias)
        module.load_params(params)
        return module

    @torch.no_grad()
    def load_params(self, params: WhiteningParams) -> None:
        if tuple(params.projection.shape) != tuple(self.fc.weight.shape):
            raise ValueError(f"whitening {tuple(params.projection.shape)} does not fit "
                             f"Linear {tuple(self.fc.weight.shape)}")
        self.fc.weight.copy_(params.projection)
        shift = -(params.projection @ params.mean)
        if self.fc.bias is not None:
            self.fc.bias.copy_(shift)
        elif shift.abs().max() > 1e-6:
            raise ValueError("a centred whitening needs bias=True")

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.fc(x), dim=-1)


def save_whitening(params: WhiteningParams, path: str | Path) -> Path:
    """Write ``params`` as a .safetensors file (tensors + JSON metadata), atomically."""
    from safetensors.torch import save_file

    from irkit.utils import atomic_path

    path = Path(path)
    tensors = {"mean": params.mean, "projection": params.projection, "eigenvalues": params.eigenvalues}
    meta = {"irkit": "whitening", "kind": params.kind}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"irkit_meta": json.dumps(meta)})
    return path


def load_whitening(path: str | Path) -> WhiteningParams:
    """Read a file written by :func:`save_whitening`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"whitening file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("irkit_meta", "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for bad files
        raise CheckpointError(f"{path}: not a readable safetensors whitening file ({exc})") from exc
    missing = {"mean", "projection", "eigenvalues"} - set(tensors)
    if missing or meta.get("irkit") != "whitening":
        raise CheckpointError(f"{path}: not an irkit whitening file (missing {sorted(missing)}); "
                              "write it with irkit.nn.whitening.save_whitening")
    return WhiteningParams(tensors["mean"], tensors["projection"], tensors["eigenvalues"],
                           kind=str(meta.get("kind", "pca")))


# ------------------------------------------------------------------- learning from a labelled set
WHITENING_METHODS = ("lw", "pca")


def label_pairs(labels, max_pairs_per_class: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Matching pairs of a labelled set: every ordered pair ``(i, j)``, ``i != j``, of rows with the
    same label (both directions, so the mean of the pairs' queries is the mean of the paired rows).

    ``max_pairs_per_class``: keep at most that many pairs of each class, drawn with ``seed`` (a class
    of n images has n(n-1) pairs; capping stops a few large classes from dominating)."""
    lab = torch.as_tensor(labels).reshape(-1).long()
    g = torch.Generator().manual_seed(int(seed))
    qs, ps = [], []
    for c in torch.unique(lab).tolist():
        rows = torch.nonzero(lab == c).squeeze(1)
        if rows.numel() < 2:
            continue
        q = rows.repeat_interleave(rows.numel())
        p = rows.repeat(rows.numel())
        keep = q != p
        q, p = q[keep], p[keep]
        if max_pairs_per_class is not None and q.numel() > max_pairs_per_class:
            pick = torch.randperm(q.numel(), generator=g)[:int(max_pairs_per_class)].sort().values
            q, p = q[pick], p[pick]
        qs.append(q)
        ps.append(p)
    if not qs:
        raise ConfigError("no class has two images: learned whitening needs matching pairs (same label)")
    return torch.cat(qs), torch.cat(ps)


def learn_whitening(x: Tensor, labels=None, method: str = "lw", dims: int | None = None, shrinkage: float = 0.0,
                    max_pairs_per_class: int | None = None, seed: int = 0) -> WhiteningParams:
    """Whitening of descriptors ``x`` [N, D] of a labelled learning set.

    ``method="lw"``: :func:`learn_lw` on every descriptor with the matching pairs of
    :func:`label_pairs` (images of one label); ``"pca"``: :func:`learn_pca_whitening` (labels not
    needed). With fewer images than dimensions the covariances are singular: keep ``dims`` below N
    or give ``shrinkage`` > 0."""
    if method not in WHITENING_METHODS:
        raise ConfigError(f"unknown whitening method {method!r}; use {' or '.join(WHITENING_METHODS)}")
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ConfigError(f"whitening needs descriptors [N >= 2, D], got shape {tuple(x.shape)}")
    if dims is not None and not 1 <= int(dims) <= x.shape[1]:
        raise ConfigError(f"whitening dims must be in [1, {x.shape[1]}], got {dims}")
    if method == "pca":
        return learn_pca_whitening(x, dims=dims, shrinkage=shrinkage)
    if labels is None:
        raise ConfigError("Lw whitening needs labels (images of one label are matching pairs)")
    if len(labels) != x.shape[0]:
        raise ConfigError(f"{x.shape[0]} descriptors but {len(labels)} labels")
    qi, pi = label_pairs(labels, max_pairs_per_class, seed)
    return learn_lw(x, qi, pi, dims=dims, shrinkage=shrinkage)


def to_linear_state(params: WhiteningParams, out_dim: int | None = None) -> dict[str, Tensor]:
    """``{"weight", "bias"}`` of a ``Linear(D, out_dim)`` computing ``P (x - mean)``; a whitening
    that keeps ``d < out_dim`` directions gets zero rows (its descriptors keep ``out_dim`` entries,
    the last ``out_dim - d`` are 0, and dot products equal those of the ``d``-D descriptors)."""
    proj, mean = params.projection.float(), params.mean.float()
    d, D = proj.shape
    out_dim = d if out_dim is None else int(out_dim)
    if d > out_dim:
        raise ConfigError(f"a {d}-D whitening does not fit a {out_dim}-D output")
    weight = torch.zeros(out_dim, D)
    weight[:d] = proj
    return {"weight": weight, "bias": -(weight @ mean)}

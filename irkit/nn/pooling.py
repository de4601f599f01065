"""Global and regional pooling of a conv map [B, C, H, W]: MAC, SPoC, GeM, R-MAC (Tolias grid),
regional GeM and pooling over arbitrary box lists; functional and module forms."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from irkit.errors import ConfigError
from irkit.nn.whitening import WhiteningParams, learn_pca_whitening


def gem(x: Tensor, p: Tensor | float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised mean: (mean over positions of clamp(x, eps)^p)^(1/p). p=1 is SPoC, p->inf is MAC."""
    if isinstance(p, Tensor):
        p = p.reshape(-1)[0] if p.numel() == 1 else p.view(1, -1, 1, 1)
    pooled = F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1)))
    return pooled.pow(1.0 / p).flatten(1)


class GeM(nn.Module):
    """GeM pooling; ``p`` is a parameter of shape [1] (trainable unless ``learn_p=False``)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> None:
        super().__init__()
        self.eps = eps
        if learn_p:
            self.p = nn.Parameter(torch.ones(1) * p)
        else:
            self.register_buffer("p", torch.ones(1) * p, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()[0]):.4f}, eps={self.eps}"


# --- MAC / SPoC ----------------------------------------------------------------------------------
def mac(x: Tensor) -> Tensor:
    """Maximum activation of convolutions: per-channel max over positions, [B, C, H, W] -> [B, C]."""
    return x.amax(dim=(-2, -1))


def spoc(x: Tensor) -> Tensor:
    """Sum-pooled convolutional features, as the mean over positions (scale-free; GeM with p=1)."""
    return x.mean(dim=(-2, -1))


class MAC(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return mac(x)


class SPoC(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return spoc(x)


# --- regions (Tolias R-MAC grid, or any box list) -------------------------------------------------
_RMAC_STEPS = (2, 3, 4, 5, 6, 7)  # candidate region counts along the longer side (level 1)


def _long_side_extra(H: int, W: int, overlap: float) -> int:
    """Extra regions along the longer side, as Tolias' ``rmac_regionvec_act.m`` chooses them.

    With w = min(H, W), each candidate count n in 2..7 spaces level-1 squares of side w by
    b = (max(H, W) - w) / (n - 1); the overlap error is |(w^2 - w*b) / w^2 - overlap|, evaluated in
    that order in float64 (so exact ties resolve as in the reference), and the FIRST minimum wins.
    The extra count n - 1 is kept at every level. 0 for square maps.
    """
    if H == W:
        return 0
    w, long = min(H, W), max(H, W)
    best_i, best_err = 0, math.inf
    for i, n in enumerate(_RMAC_STEPS):
        b = (long - w) / (n - 1)
        err = abs((w ** 2 - w * b) / w ** 2 - overlap)
        if err < best_err:  # strict: the first minimum is kept on ties
            best_i, best_err = i, err
    return best_i + 1


def _grid_starts(length: int, side: int, n: int) -> list[int]:
    """Starts of ``n`` squares of ``side`` along ``length``: floor(wl2 + k*b) - wl2 with
    wl2 = floor(side/2 - 1) and b = (length - side) / (n - 1) in float64 (the reference's centre
    arithmetic; it puts the last square's end on the border)."""
    wl2 = (side - 2) // 2            # == floor(side / 2 - 1), exact in integers
    b = (length - side) / (n - 1) if n > 1 else 0.0
    return [math.floor(wl2 + k * b) - wl2 for k in range(n)]


def rmac_regions(H: int, W: int, L: int = 3, overlap: float = 0.4, whole_image: bool = False) -> Tensor:
    """Boxes of the Tolias R-MAC grid on an H x W map: int64 [R, 4] as (x1, y1, x2, y2), end-exclusive.

    Exactly the authors' ``rmac_regionvec_act.m``: level l = 1..L has square regions of side
    wl = floor(2 min(H, W) / (l + 1)); a level with wl = 0 is skipped (a map with a side of 1 keeps
    level 1 only); l regions along the shorter side and l + m along the longer one (m from
    :func:`_long_side_extra`, overlap closest to ``overlap``); starts from :func:`_grid_starts`, so
    the first region of a level starts at 0 and the last ends on the border. ``whole_image``
    prepends (0, 0, W, H) (cirtorch's variant; Tolias' and Gordo's grids do not have it). Levels are
    listed coarse to fine, row-major within a level.
    """
    if H < 1 or W < 1 or L < 0:
        raise ValueError(f"rmac_regions needs H, W >= 1 and L >= 0, got H={H}, W={W}, L={L}")
    extra = _long_side_extra(H, W, overlap)
    extra_w, extra_h = (extra, 0) if W > H else (0, extra)
    boxes: list[tuple[int, int, int, int]] = [(0, 0, W, H)] if whole_image else []
    for level in range(1, L + 1):
        side = (2 * min(H, W)) // (level + 1)
        if side == 0:
            continue
        ys = _grid_starts(H, side, level + extra_h)
        xs = _grid_starts(W, side, level + extra_w)
        boxes.extend((x0, y, x0 + side, y + side) for y in ys for x0 in xs)
    return torch.tensor(boxes, dtype=torch.long).reshape(-1, 4)


def pool_regions(x: Tensor, boxes: Tensor | Sequence[Sequence[int]], kind: str = "max",
                 p: Tensor | float = 3.0, eps: float = 1e-6) -> Tensor:
    """Pool every box of ``boxes`` ([R, 4] (x1, y1, x2, y2) end-exclusive ints in map coordinates,
    shared by the batch, or [B, R, 4] per image) out of ``x`` [B, C, H, W] -> [B, R, C].

    ``kind``: "max" (MAC), "avg" (SPoC) or "gem" (power ``p``). Plain slicing, so arbitrary box
    lists (e.g. learned region proposals) work and gradients flow to ``x`` (and ``p``).
    """
    if kind not in ("max", "avg", "gem"):
        raise ValueError(f"pool_regions kind must be 'max', 'avg' or 'gem', got {kind!r}")
    b = torch.as_tensor(boxes, dtype=torch.long)
    if b.dim() == 2 and b.size(-1) == 4:  # shared boxes: slice the whole batch at once
        return torch.stack([_pool_box(x, box, kind, p, eps) for box in b.tolist()], dim=1)
    if b.dim() != 3 or b.size(-1) != 4 or b.size(0) != x.size(0):
        raise ValueError(f"boxes must be [R, 4] or [B, R, 4] with B={x.size(0)}, got {tuple(b.shape)}")
    return torch.cat([torch.stack([_pool_box(x[i:i + 1], box, kind, p, eps) for box in b[i].tolist()], dim=1)
                      for i in range(x.size(0))], dim=0)


def _pool_box(x: Tensor, box: Sequence[int], kind: str, p: Tensor | float, eps: float) -> Tensor:
    H, W = x.shape[-2:]
    x1, y1, x2, y2 = box
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(W, x2), min(H, y2)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty region {tuple(box)} on a {H}x{W} map")
    patch = x[:, :, y1:y2, x1:x2]
    if kind == "max":
        return mac(patch)
    return spoc(patch) if kind == "avg" else gem(patch, p, eps)


def regional_descriptor(x: Tensor, boxes: Tensor, kind: str = "max", proj: nn.Module | None = None,
                        p: Tensor | float = 3.0, eps: float = 1e-6) -> Tensor:
    """R-MAC aggregation: per region pool -> L2 -> ``proj`` (shift + FC / PCA-whitening; skipped when
    None) -> L2, summed over regions -> L2. Returns [B, D]."""
    r = F.normalize(pool_regions(x, boxes, kind, p, eps), dim=-1)
    if proj is not None:
        r = F.normalize(proj(r), dim=-1)
    return F.normalize(r.sum(dim=1), dim=-1)


def rmac(x: Tensor, L: int = 3, overlap: float = 0.4, whole_image: bool = False,
         proj: nn.Module | None = None) -> Tensor:
    """R-MAC of ``x`` [B, C, H, W] on the Tolias grid (max-pooled regions)."""
    return regional_descriptor(x, rmac_regions(x.size(-2), x.size(-1), L, overlap, whole_image), "max", proj)


def regional_gem(x: Tensor, L: int = 3, p: Tensor | float = 3.0, overlap: float = 0.4,
                 whole_image: bool = False, proj: nn.Module | None = None, eps: float = 1e-6) -> Tensor:
    """R-MAC with GeM instead of max per region."""
    boxes = rmac_regions(x.size(-2), x.size(-1), L, overlap, whole_image)
    return regional_descriptor(x, boxes, "gem", proj, p, eps)


class RegionProjection(nn.Module):
    """The per-region "shift + FC" of R-MAC: y = W (r - mu); ``mu`` is a learnable shift and W a
    learnable Linear, both initialisable from a PCA-whitening (:meth:`init_from_whitening`)."""

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim))
        self.fc = nn.Linear(dim, out_dim or dim, bias=False)

    @torch.no_grad()
    def init_from_whitening(self, mean: Tensor, projection: Tensor) -> None:
        """``projection`` [out, in] applied to (r - ``mean``), as learned by irkit.nn.whitening."""
        if tuple(projection.shape) != tuple(self.fc.weight.shape) or mean.numel() != self.shift.numel():
            raise ValueError(f"whitening of shape {tuple(projection.shape)} does not fit {tuple(self.fc.weight.shape)}")
        self.shift.copy_(mean.reshape(-1))
        self.fc.weight.copy_(projection)

    def forward(self, r: Tensor) -> Tensor:
        return self.fc(r - self.shift)


class RMAC(nn.Module):
    """R-MAC (``kind="max"``) or regional GeM (``kind="gem"``) with an optional learnable projection.

    ``dim`` given -> a :class:`RegionProjection` ``dim -> out_dim`` is applied per region (initialise
    it from data with :meth:`init_whitening`, as Gordo et al. and Tolias et al. do). For
    ``kind="gem"``, ``p`` is a parameter of shape [1], trainable unless ``learn_p=False`` (as in
    :class:`GeM`); for "max"/"avg" it is an unused, non-persistent buffer.
    """

    def __init__(self, L: int = 3, overlap: float = 0.4, whole_image: bool = False, kind: str = "max",
                 dim: int | None = None, out_dim: int | None = None, p: float = 3.0, eps: float = 1e-6,
                 learn_p: bool = True) -> None:
        super().__init__()
        if kind not in ("max", "avg", "gem"):
            raise ConfigError(f"RMAC kind must be 'max', 'avg' or 'gem', got {kind!r}")
        self.L, self.overlap, self.whole_image, self.kind, self.eps = L, overlap, whole_image, kind, eps
        if kind == "gem" and learn_p:
            self.p = nn.Parameter(torch.ones(1) * p)
        else:
            self.register_buffer("p", torch.ones(1) * p, persistent=False)
        self.proj = RegionProjection(dim, out_dim) if dim else None

    def regions(self, H: int, W: int) -> Tensor:
        return rmac_regions(H, W, self.L, self.overlap, self.whole_image)

    def forward(self, x: Tensor, boxes: Tensor | None = None) -> Tensor:
        """``boxes`` overrides the grid (e.g. proposals), [R, 4] or [B, R, 4]."""
        if boxes is None:
            boxes = self.regions(x.size(-2), x.size(-1))
        return regional_descriptor(x, boxes, self.kind, self.proj, self.p, self.eps)

    @torch.no_grad()
    def init_whitening(self, maps: Iterable[Tensor], shrinkage: float = 0.0) -> WhiteningParams:
        """Initialise the per-region shift + FC from feature maps (see :func:`learn_region_whitening`),
        with this module's grid, pooling and ``p``; returns the learned whitening."""
        if self.proj is None:
            raise ConfigError("this RMAC has no region projection to initialise; build it with dim=...")
        params = learn_region_whitening(maps, self.L, self.overlap, self.whole_image, self.kind,
                                        float(self.p.detach().reshape(-1)[0]), self.eps,
                                        dims=self.proj.fc.out_features, shrinkage=shrinkage)
        self.proj.init_from_whitening(params.mean, params.projection)
        return params

    def extra_repr(self) -> str:
        return f"L={self.L}, overlap={self.overlap}, whole_image={self.whole_image}, kind={self.kind!r}"


@torch.no_grad()
def learn_region_whitening(maps: Iterable[Tensor], L: int = 3, overlap: float = 0.4, whole_image: bool = False,
                           kind: str = "max", p: float = 3.0, eps: float = 1e-6, dims: int | None = None,
                           shrinkage: float = 0.0) -> WhiteningParams:
    """PCA-whitening of regional descriptors, the initialisation of R-MAC's shift + FC (Tolias et
    al. learn it on regions of a separate image set; Gordo et al. initialise their layers with it).

    ``maps``: feature maps [B, C, H, W] (or [C, H, W]), e.g. a backbone's output batch by batch. Each
    map's regions on the Tolias grid are pooled (``kind``) and L2-normalised, exactly as R-MAC does
    before its projection; all regions of all maps are the learning set of
    :func:`irkit.nn.whitening.learn_pca_whitening` (mean, eigenvalue^-1/2 scaling, ``dims``
    directions). Load the result with :meth:`RegionProjection.init_from_whitening`.
    """
    regions = []
    for fmap in maps:
        fmap = fmap.unsqueeze(0) if fmap.dim() == 3 else fmap
        if fmap.dim() != 4:
            raise ConfigError(f"feature maps must be [B, C, H, W] or [C, H, W], got {tuple(fmap.shape)}")
        boxes = rmac_regions(fmap.size(-2), fmap.size(-1), L, overlap, whole_image)
        pooled = F.normalize(pool_regions(fmap, boxes, kind, p, eps), dim=-1)
        regions.append(pooled.reshape(-1, pooled.size(-1)).double().cpu())
    if not regions:
        raise ConfigError("learn_region_whitening needs at least one feature map")
    r = torch.cat(regions)
    if r.size(0) < 2:
        raise ConfigError(f"learn_region_whitening needs at least 2 regions, got {r.size(0)}: give more maps")
    return learn_pca_whitening(r, dims=dims, power=0.5, shrinkage=shrinkage)

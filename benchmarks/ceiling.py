"""What the best coordinate-wise correction of a quantized weight gradient could recover.

A coordinate-wise correction maps each element of a layer's quantized weight gradient ``g_q`` to
``c(g_q, W)`` from that element's own values and layer-wide scales, as MetaGrad's hypernetwork
does. Its score is the cosine between ``c`` and the full-precision gradient ``g`` of the same
batch, per layer; pooled over layers, their mean.

The families (:class:`Family`) are linear in their parameters and contain the identity. Elements
fall into cells: the quantile bin of ``|g_q| / rms(g_q)`` (levels :data:`GRAD_LEVELS`, finer in
the tails), optionally crossed with ``sign(g_q * W)``, with bins of ``W / rms(W)`` (quantile
bins of ``|W|`` times the sign of ``W``), or with ``sign(g_q)`` and those bins. In cell ``k``
the correction is ``m_k * g_q`` (gain) or ``m_k * g_q + a_k * rms(g_q)`` (gain and offset);
``m = 1, a = 0`` is the identity. Bin edges come from the fit batches.

For a family ``c = F theta`` the largest cosine to ``g`` on one batch is that of the
least-squares projection of ``g`` onto the span of ``F``: ``||P g|| / ||g||``, in closed form.
Over several fit batches of a layer, or over all layers with one shared ``theta`` (scored, like
the hypernetwork, by the mean of the layers' cosines), there is no closed form: the mean cosine
is maximised by L-BFGS in float64, started from the better of the identity and the pooled
least-squares projection, keeping the best point evaluated. A family therefore never scores
below the identity on its fit batches; held-out batches say how much of the gain is real.

Everything is computed from five sums per cell and batch (of ``u^2``, ``u``, ``1``, ``u t`` and
``t``, with ``u = g_q / rms(g_q)`` and ``t = g / rms(g_q)``) and ``||t||^2``, so fitting costs
little next to computing the gradients. Batches whose quantized or full-precision gradient is
all zero or not finite have no defined cosine: they are skipped and counted, never rescaled.

:func:`snr_profile` measures what decides whether a shrinkage can help: how the per-element
signal-to-noise ratio of the quantized gradient varies with the element's size (a ratio that does
not vary leaves nothing to gain; one that rises with size pays off only as far as the gradient's
distribution has heavier tails than a Gaussian, hence its kurtosis alongside).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

LayerBatch = tuple[Tensor, Tensor, Tensor]
"""One batch of one layer: ``(quantized gradient, full-precision gradient, weight)``."""

GRAD_LEVELS: tuple[float, ...] = (
    0.001,
    0.01,
    0.03,
    *(round(0.05 * i, 2) for i in range(1, 20)),
    0.97,
    0.99,
    0.999,
)
"""Quantile levels of ``|g_q| / rms(g_q)`` that bound the gradient bins (finer in both tails)."""
WEIGHT_LEVELS: tuple[float, ...] = (0.25, 0.5, 0.75)
"""Quantile levels of ``|W| / rms(W)``; each side of 0 gets these bins."""
CROSSES: tuple[str, ...] = ("none", "sign_gw", "weight", "sign_g_weight")
"""What the gradient bins are crossed with: nothing, ``sign(g_q W)``, weight bins, or both
``sign(g_q)`` and weight bins."""
SNR_LEVELS: tuple[float, ...] = (*(round(0.1 * i, 1) for i in range(1, 10)), 0.99)
"""Quantile levels of ``|g| / rms(g)`` that bound the bins of :func:`snr_profile`."""
MAX_ITER = 200
"""L-BFGS iterations per fit."""


@dataclass(frozen=True)
class Family:
    """A family of corrections: ``m_k g_q`` (``offset``: ``+ a_k rms(g_q)``) per cell ``k``."""

    name: str
    offset: bool = False
    cross: str = "none"

    def __post_init__(self) -> None:
        if self.cross not in CROSSES:
            raise ValueError(f"cross must be one of {', '.join(CROSSES)}, got {self.cross!r}")


FAMILIES: tuple[Family, ...] = (
    Family("gain"),
    Family("gain+offset", offset=True),
    Family("gain|sign(gW)", cross="sign_gw"),
    Family("gain|W", cross="weight"),
    Family("gain+offset|sign(g),W", offset=True, cross="sign_g_weight"),
)
"""The default families; the last contains all the others."""


@dataclass(frozen=True)
class Scores:
    """Mean cosine to the full-precision gradient on the fit batches and on the held-out ones."""

    fit: float
    held_out: float

    def to_dict(self) -> dict[str, float]:
        return {"fit": self.fit, "held_out": self.held_out}


@dataclass
class Correction:
    """A fitted correction: cell edges and, per (gradient bin, cross cell), gain and offset.

    Gains are on the least-squares scale (the best multiple of the correction, in squared error,
    on the fit batches); cells without fit data keep the identity at the identity's
    least-squares scale. ``fitted`` counts the parameters that were fitted.
    """

    grad_edges: Tensor
    weight_edges: Tensor
    gain: Tensor
    offset: Tensor
    fitted: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "grad_edges": _rounded(self.grad_edges),
            "weight_edges": _rounded(self.weight_edges),
            "gain": _rounded(self.gain),
            "offset": _rounded(self.offset),
            "fitted": self.fitted,
        }


@dataclass
class FamilyCeiling:
    """One family's best cosines: fitted to each layer alone, and one fit shared by all."""

    family: Family
    per_layer: dict[str, Scores]
    shared: dict[str, Scores]
    pooled_per_layer: Scores
    pooled_shared: Scores
    layer_corrections: dict[str, Correction]
    shared_correction: Correction

    def to_dict(self, corrections: bool = False) -> dict[str, Any]:
        per_layer: dict[str, Any] = {
            "pooled": self.pooled_per_layer.to_dict(),
            "fitted": sum(c.fitted for c in self.layer_corrections.values()),
            "layers": {n: s.to_dict() for n, s in self.per_layer.items()},
        }
        shared: dict[str, Any] = {
            "pooled": self.pooled_shared.to_dict(),
            "fitted": self.shared_correction.fitted,
            "layers": {n: s.to_dict() for n, s in self.shared.items()},
        }
        if corrections:
            shared["correction"] = self.shared_correction.to_dict()
        return {
            "offset": self.family.offset,
            "cross": self.family.cross,
            "per_layer": per_layer,
            "shared": shared,
        }


@dataclass
class Ceiling:
    """The identity's cosines and each family's ceiling, per layer and pooled (mean over layers).

    ``skipped`` counts, per layer, the batches left out (all-zero or non-finite gradients);
    ``excluded`` lists the layers left out entirely (no usable fit or held-out batch).
    """

    identity: dict[str, Scores]
    pooled_identity: Scores
    families: dict[str, FamilyCeiling]
    skipped: dict[str, int] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)

    def to_dict(self, corrections: bool = False) -> dict[str, Any]:
        return {
            "layers": list(self.identity),
            "skipped_batches": self.skipped,
            "excluded_layers": self.excluded,
            "identity": {
                "pooled": self.pooled_identity.to_dict(),
                "layers": {n: s.to_dict() for n, s in self.identity.items()},
            },
            "families": {n: f.to_dict(corrections) for n, f in self.families.items()},
        }


# ------------------------------------------------------------------------------------------
# Data: normalised batches, cells, sufficient statistics
# ------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """One usable layer batch, flattened: ``u = g_q / rms(g_q)``, ``w = W / rms(W)`` (0 for an
    all-zero weight) and ``t = g / rms(g_q)``, in float64."""

    u: Tensor
    w: Tensor
    t: Tensor


def _prepare(batch: LayerBatch) -> _Batch | None:
    """The normalised batch, or None if its cosine is undefined (all-zero or non-finite)."""
    quantized, full, weight = (x.detach().reshape(-1).double() for x in batch)
    if not (quantized.shape == full.shape == weight.shape):
        raise ValueError(
            f"quantized {tuple(batch[0].shape)}, full {tuple(batch[1].shape)} and weight "
            f"{tuple(batch[2].shape)} gradients must have the same number of elements"
        )
    if not (torch.isfinite(quantized).all() and torch.isfinite(full).all()):
        return None
    scale = quantized.square().mean().sqrt()
    if scale == 0 or not full.ne(0).any():
        return None
    w_scale = weight.square().mean().sqrt()
    w = weight / w_scale if torch.isfinite(w_scale) and w_scale > 0 else torch.zeros_like(weight)
    return _Batch(quantized / scale, w, full / scale)


def _quantiles(parts: Sequence[tuple[Tensor, float]], levels: Sequence[float]) -> Tensor:
    """Weighted quantiles of the union of ``parts``, each ``(values, total weight)``; unique."""
    if not levels:
        return torch.empty(0, dtype=torch.float64)
    values = torch.cat([v for v, _ in parts])
    weights = torch.cat([torch.full_like(v, w / v.numel()) for v, w in parts])
    values, order = values.sort()
    cumulative = weights[order].cumsum(0)
    cumulative /= cumulative[-1].clone()
    at = torch.tensor(levels, dtype=torch.float64)
    index = torch.searchsorted(cumulative, at).clamp_max(values.numel() - 1)
    return values[index].unique()


@dataclass
class _Binned:
    """A batch with its gradient bin and signed weight bin per element, under one set of edges."""

    batch: _Batch
    grad_bin: Tensor
    weight_bin: Tensor
    edges: tuple[Tensor, Tensor]


def _edges_of(binned: Sequence[_Binned]) -> tuple[Tensor, Tensor]:
    return binned[0].edges


def _bin(batches: Sequence[_Batch], edges: tuple[Tensor, Tensor]) -> list[_Binned]:
    grad_edges, weight_edges = edges
    side = weight_edges.numel() + 1
    return [
        _Binned(
            b,
            torch.bucketize(b.u.abs(), grad_edges),
            torch.bucketize(b.w.abs(), weight_edges) + (b.w < 0).long() * side,
            edges,
        )
        for b in batches
    ]


@dataclass(frozen=True)
class _Cells:
    """The cells of one family under one set of bin edges."""

    cross: str
    grad_edges: Tensor
    weight_edges: Tensor

    @property
    def weight_bins(self) -> int:
        return 2 * (self.weight_edges.numel() + 1)

    @property
    def n_cross(self) -> int:
        return {
            "none": 1,
            "sign_gw": 2,
            "weight": self.weight_bins,
            "sign_g_weight": 3 * self.weight_bins,
        }[self.cross]

    @property
    def size(self) -> int:
        return (self.grad_edges.numel() + 1) * self.n_cross

    def index(self, binned: _Binned) -> Tensor:
        """The cell of every element."""
        if self.cross == "none":
            return binned.grad_bin
        b = binned.batch
        if self.cross == "sign_gw":
            cross = (b.u * b.w > 0).long()
        elif self.cross == "weight":
            cross = binned.weight_bin
        else:
            cross = binned.weight_bin + (b.u.sign().long() + 1) * self.weight_bins
        return binned.grad_bin * self.n_cross + cross


def _stats(cells: _Cells, batches: Sequence[_Binned]) -> tuple[Tensor, Tensor]:
    """Per batch the five sums per cell, ``(batches, 5, cells)``, and ``||t||^2``, ``(batches,)``.

    The sums are of ``u^2``, ``u``, ``1``, ``u t`` and ``t`` over the cell's elements.
    """
    sums, norms = [], []
    for binned in batches:
        index, b = cells.index(binned), binned.batch

        def total(weights: Tensor | None, index: Tensor = index) -> Tensor:
            return torch.bincount(index, weights, minlength=cells.size).double()

        sums.append(
            torch.stack([total(b.u * b.u), total(b.u), total(None), total(b.u * b.t), total(b.t)])
        )
        norms.append(b.t.square().sum())
    return torch.stack(sums), torch.stack(norms)


# ------------------------------------------------------------------------------------------
# Fitting
# ------------------------------------------------------------------------------------------


def _cosines(stats: Tensor, norms: Tensor, gain: Tensor, offset: Tensor) -> Tensor:
    """Cosine between ``m g_q + a rms(g_q)`` (per cell) and ``g``, per batch."""
    suu, su, n, sut, st = stats.unbind(1)
    dot = (sut * gain + st * offset).sum(-1)
    square = (suu * gain * gain + 2 * su * gain * offset + n * offset * offset).sum(-1)
    denominator = (square.clamp_min(0) * norms).sqrt()
    return torch.where(denominator > 0, dot / denominator.clamp_min(1e-300), 0.0)


def _least_squares(total: Tensor, offset: bool) -> tuple[Tensor, Tensor]:
    """Per-cell least-squares ``(m, a)`` from summed statistics (identity where undetermined)."""
    suu, su, n, sut, st = total
    gain = torch.where(suu > 0, sut / suu.clamp_min(1e-300), 1.0)
    shift = torch.zeros_like(gain)
    if offset:
        det = suu * n - su * su
        solvable = det > 1e-12 * suu * n
        safe = torch.where(solvable, det, 1.0)
        gain = torch.where(solvable, (n * sut - su * st) / safe, gain)
        shift = torch.where(solvable, (suu * st - su * sut) / safe, shift)
        only_zeros = (suu == 0) & (n > 0)
        shift = torch.where(only_zeros, st / n.clamp_min(1), shift)
    return gain, shift


@dataclass
class _Fit:
    gain: Tensor
    offset: Tensor
    fitted: int
    value: float


def _objective(
    stats: Tensor, norms: Tensor, weights: Tensor, gain: Tensor, shift: Tensor
) -> tuple[float, Tensor, Tensor]:
    """``sum(weights * cosine)`` and its gradient with respect to gains and offsets."""
    suu, su, n, sut, st = stats.unbind(1)
    dot = (sut * gain + st * shift).sum(-1)
    square = (suu * gain * gain + 2 * su * gain * shift + n * shift * shift).sum(-1)
    root = (square.clamp_min(0) * norms).sqrt()
    valid = root > 0
    safe_root, safe_square = root.clamp_min(1e-300), square.clamp_min(1e-300)
    cosine = torch.where(valid, dot / safe_root, 0.0)
    ratio = torch.where(valid, dot / safe_square, 0.0)[:, None]
    coef = torch.where(valid, weights / safe_root, 0.0)[:, None]
    d_gain = (coef * (sut - ratio * (suu * gain + su * shift))).sum(0)
    d_shift = (coef * (st - ratio * (su * gain + n * shift))).sum(0)
    return float((weights * cosine).sum()), d_gain, d_shift


def _fit(stats: Tensor, norms: Tensor, weights: Tensor, ls_weights: Tensor, offset: bool) -> _Fit:
    """Maximise ``sum(weights * cosine)`` over gains (and offsets); never below the identity.

    ``stats`` and ``norms`` are per batch (:func:`_stats`); ``ls_weights`` weight the batches in
    the least-squares start and the final scale.
    """
    cells = stats.shape[-1]
    total = (ls_weights[:, None, None] * stats).sum(0)
    free_gain = total[0] > 0
    free_offset = total[2] > 0 if offset else torch.zeros(cells, dtype=torch.bool)
    identity = (torch.ones(cells, dtype=torch.float64), torch.zeros(cells, dtype=torch.float64))
    gain_at, offset_at = free_gain.nonzero()[:, 0], free_offset.nonzero()[:, 0]

    def unpack(x: Tensor) -> tuple[Tensor, Tensor]:
        gain = identity[0].index_put((gain_at,), x[: gain_at.numel()])
        shift = identity[1].index_put((offset_at,), x[gain_at.numel() :])
        return gain, shift

    starts = [identity, _least_squares(total, offset)]
    values = [_objective(stats, norms, weights, *s)[0] for s in starts]
    start = starts[max(range(len(starts)), key=values.__getitem__)]
    x = torch.cat([start[0][free_gain], start[1][free_offset]])
    best = [max(values), x.clone()]
    if x.numel():
        x.requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [x],
            lr=1.0,
            max_iter=MAX_ITER,
            history_size=20,
            tolerance_grad=1e-12,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            point = x.detach()
            value, d_gain, d_shift = _objective(stats, norms, weights, *unpack(point))
            if math.isfinite(value) and value > best[0]:
                best[0], best[1] = value, point.clone()
            x.grad = -torch.cat([d_gain[gain_at], d_shift[offset_at]])
            return torch.tensor(-value, dtype=torch.float64)

        optimizer.step(closure)
    gain, shift = unpack(best[1])
    gain, shift = _least_squares_scale(total, gain, shift, free_gain | free_offset)
    return _Fit(gain, shift, int(free_gain.sum() + free_offset.sum()), best[0])


def _least_squares_scale(
    total: Tensor, gain: Tensor, shift: Tensor, active: Tensor
) -> tuple[Tensor, Tensor]:
    """Rescale to the least-squares multiple; cells without data get the identity's."""
    suu, su, n, sut, st = total
    dot = (sut * gain + st * shift).sum()
    square = (suu * gain * gain + 2 * su * gain * shift + n * shift * shift).sum()
    scale = dot / square if square > 0 and dot > 0 else torch.tensor(1.0, dtype=torch.float64)
    identity_scale = sut.sum() / suu.sum() if suu.sum() > 0 and sut.sum() > 0 else 1.0
    gain = torch.where(active, gain * scale, identity_scale)
    shift = torch.where(active, shift * scale, 0.0)
    return gain, shift


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _rounded(t: Tensor, digits: int = 5) -> Any:
    return torch.round(t.double(), decimals=digits).tolist()


# ------------------------------------------------------------------------------------------
# The ceiling
# ------------------------------------------------------------------------------------------


def coordinatewise_ceiling(
    fit: Mapping[str, Sequence[LayerBatch]],
    held_out: Mapping[str, Sequence[LayerBatch]],
    families: Sequence[Family] = FAMILIES,
    *,
    grad_levels: Sequence[float] = GRAD_LEVELS,
    weight_levels: Sequence[float] = WEIGHT_LEVELS,
) -> Ceiling:
    """Each family's best cosine to the full-precision gradient, per layer and pooled.

    Args:
        fit: per layer name, the batches ``(quantized grad, full grad, weight)`` to fit on.
        held_out: per layer name, other batches to score the fitted corrections on.
        families: the correction families (:data:`FAMILIES`).
        grad_levels: quantile levels of ``|g_q| / rms(g_q)`` bounding the gradient bins.
        weight_levels: quantile levels of ``|W| / rms(W)`` bounding the weight bins (each side).

    Each family is fitted twice: to each layer alone (its own bin edges, mean cosine over its
    fit batches) and once for all layers (edges from all layers weighted equally; mean over
    layers of their mean cosine over batches).
    """
    if set(fit) != set(held_out):
        raise ValueError("fit and held_out must have the same layers")
    prepared: dict[str, tuple[list[_Batch], list[_Batch]]] = {}
    skipped: dict[str, int] = {}
    excluded: list[str] = []
    for name in fit:
        fit_batches = [b for b in map(_prepare, fit[name]) if b is not None]
        held_batches = [b for b in map(_prepare, held_out[name]) if b is not None]
        skipped[name] = len(fit[name]) + len(held_out[name]) - len(fit_batches) - len(held_batches)
        if fit_batches and held_batches:
            prepared[name] = (fit_batches, held_batches)
        else:
            excluded.append(name)
    if not prepared:
        raise ValueError("no layer has a usable fit and held-out batch (all zero or non-finite)")

    identity = {}
    for name, (fit_batches, held_batches) in prepared.items():
        identity[name] = Scores(_identity_mean(fit_batches), _identity_mean(held_batches))
    pooled_identity = _pooled(identity)

    def edges(parts: list[tuple[_Batch, float]]) -> tuple[Tensor, Tensor]:
        grad = _quantiles([(b.u.abs(), w) for b, w in parts], grad_levels)
        weight = _quantiles([(b.w.abs(), w) for b, w in parts], weight_levels)
        return grad, weight

    layer_binned = {}
    for name, (fit_batches, held_batches) in prepared.items():
        layer_edges = edges([(b, 1.0) for b in fit_batches])
        layer_binned[name] = (_bin(fit_batches, layer_edges), _bin(held_batches, layer_edges))
    shared_edges = edges([(b, 1.0 / len(fit_b)) for fit_b, _ in prepared.values() for b in fit_b])
    shared_binned = {
        name: (_bin(fit_batches, shared_edges), _bin(held_batches, shared_edges))
        for name, (fit_batches, held_batches) in prepared.items()
    }

    results = {}
    for family in families:
        per_layer, corrections = {}, {}
        for name, (fit_binned, held_binned) in layer_binned.items():
            grad_edges, weight_edges = _edges_of(fit_binned)
            cells = _Cells(family.cross, grad_edges, weight_edges)
            stats, norms = _stats(cells, fit_binned)
            k = len(fit_binned)
            uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
            result = _fit(stats, norms, uniform, torch.ones(k, dtype=torch.float64), family.offset)
            held = _score(cells, held_binned, result.gain, result.offset)
            per_layer[name] = Scores(result.value, held)
            corrections[name] = _correction(cells, result)
        results[family.name] = _shared_family(
            _Cells(family.cross, *shared_edges), shared_binned, per_layer, corrections, family
        )
    return Ceiling(identity, pooled_identity, results, skipped, excluded)


def _shared_family(
    cells: _Cells,
    binned: Mapping[str, tuple[list[_Binned], list[_Binned]]],
    per_layer: dict[str, Scores],
    corrections: dict[str, Correction],
    family: Family,
) -> FamilyCeiling:
    """Fit one correction to all layers (each layer weighted equally) and score it."""
    stats, norms, weights, ls_weights, owners = [], [], [], [], []
    for name, (fit_binned, _) in binned.items():
        s, n = _stats(cells, fit_binned)
        stats.append(s)
        norms.append(n)
        k = len(fit_binned)
        weights += [1.0 / (k * len(binned))] * k
        ls_weights += [1.0 / (k * b.batch.u.numel()) for b in fit_binned]
        owners += [name] * k
    stats_all, norms_all = torch.cat(stats), torch.cat(norms)
    result = _fit(
        stats_all,
        norms_all,
        torch.tensor(weights, dtype=torch.float64),
        torch.tensor(ls_weights, dtype=torch.float64),
        family.offset,
    )
    fit_cosines = _cosines(stats_all, norms_all, result.gain, result.offset).tolist()
    shared = {}
    for name, (_, held_binned) in binned.items():
        mine = [c for c, owner in zip(fit_cosines, owners, strict=True) if owner == name]
        held = _score(cells, held_binned, result.gain, result.offset)
        shared[name] = Scores(_mean(mine), held)
    return FamilyCeiling(
        family=family,
        per_layer=per_layer,
        shared=shared,
        pooled_per_layer=_pooled(per_layer),
        pooled_shared=_pooled(shared),
        layer_corrections=corrections,
        shared_correction=_correction(cells, result),
    )


def _identity_mean(batches: Sequence[_Batch]) -> float:
    return _mean([float(torch.nn.functional.cosine_similarity(b.u, b.t, dim=0)) for b in batches])


def _score(cells: _Cells, batches: Sequence[_Binned], gain: Tensor, offset: Tensor) -> float:
    stats, norms = _stats(cells, batches)
    return float(_cosines(stats, norms, gain, offset).mean())


def _pooled(scores: Mapping[str, Scores]) -> Scores:
    return Scores(
        _mean([s.fit for s in scores.values()]), _mean([s.held_out for s in scores.values()])
    )


def _correction(cells: _Cells, result: _Fit) -> Correction:
    shape = (cells.grad_edges.numel() + 1, cells.n_cross)
    return Correction(
        cells.grad_edges,
        cells.weight_edges,
        result.gain.reshape(shape),
        result.offset.reshape(shape),
        result.fitted,
    )


# ------------------------------------------------------------------------------------------
# Signal-to-noise ratio by element size
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SNRProfile:
    """Per-element signal-to-noise ratio of a quantized gradient, in bins of ``|g| / rms(g)``.

    Per bin: ``size`` (rms of ``g / rms(g)``), ``count``, ``snr_mse`` (mean ``g^2`` over mean
    ``(g_q - g)^2``: rounding bias included, defined for one draw) and ``snr_variance`` (mean
    ``g^2`` over the mean variance of ``g_q`` across draws; None with one draw). ``slope_*`` is
    the least-squares slope of ``log snr`` against ``log size`` over the bins: 0 when the ratio
    does not depend on the element's size, 2 for noise of one variance everywhere.
    ``overall_*`` are the ratios over all elements; ``kurtosis`` is ``mean(g^4) / mean(g^2)^2``
    (3 for a Gaussian: the heavier the tails, the more a shrinkage of small elements can gain
    when the ratio rises with size); ``zeros`` counts elements with ``g = 0``, left out.
    """

    edges: list[float]
    size: list[float]
    count: list[int]
    snr_mse: list[float]
    snr_variance: list[float] | None
    slope_mse: float
    slope_variance: float | None
    overall_mse: float
    overall_variance: float | None
    kurtosis: float
    zeros: int

    def to_dict(self) -> dict[str, Any]:
        """The fields, with infinite or undefined ratios and slopes as None (strict JSON)."""
        return {k: _finite_or_none(getattr(self, k)) for k in self.__dataclass_fields__}


def snr_profile(full: Tensor, draws: Tensor, levels: Sequence[float] = SNR_LEVELS) -> SNRProfile:
    """The signal-to-noise profile of ``draws`` (``(R, *full.shape)``) around ``full``.

    ``draws`` are ``R >= 1`` quantized gradients of the same batch and weights, differing only by
    the rounding's random draws (one draw for deterministic rounding). Bins are quantiles
    ``levels`` of ``|g| / rms(g)`` over the nonzero elements of ``full``.
    """
    if draws.dim() != full.dim() + 1 or draws.shape[1:] != full.shape or draws.shape[0] < 1:
        raise ValueError(
            f"draws must be (R, *full.shape) with R >= 1; got {tuple(draws.shape)} for "
            f"full {tuple(full.shape)}"
        )
    g = full.detach().reshape(-1).double()
    q = draws.detach().reshape(draws.shape[0], -1).double()
    nonzero = g != 0
    g, q = g[nonzero], q[:, nonzero]
    if g.numel() == 0:
        raise ValueError("the full-precision gradient is all zero: no signal to measure")
    magnitude = g.abs() / g.square().mean().sqrt()
    edges = _quantiles([(magnitude, 1.0)], levels)
    bins = torch.bucketize(magnitude, edges)
    n_bins = edges.numel() + 1

    def per_bin(values: Tensor) -> Tensor:
        return torch.bincount(bins, values, minlength=n_bins).double()

    count = torch.bincount(bins, minlength=n_bins)
    signal = per_bin(g.square())
    error = per_bin((q - g).square().mean(0))
    size = (per_bin(magnitude.square()) / count.clamp_min(1)).sqrt()
    variance = per_bin(q.var(0)) if q.shape[0] > 1 else None

    def ratio(noise: Tensor) -> Tensor:
        return torch.where(noise > 0, signal / noise.clamp_min(1e-300), math.inf)

    def overall(noise: Tensor) -> float:
        return float(signal.sum() / noise.sum()) if noise.sum() > 0 else math.inf

    used = count > 0
    snr_mse = ratio(error)[used]
    snr_var = ratio(variance)[used] if variance is not None else None
    size = size[used]
    return SNRProfile(
        edges=edges.tolist(),
        size=size.tolist(),
        count=count[used].tolist(),
        snr_mse=snr_mse.tolist(),
        snr_variance=None if snr_var is None else snr_var.tolist(),
        slope_mse=_log_slope(size, snr_mse),
        slope_variance=None if snr_var is None else _log_slope(size, snr_var),
        overall_mse=overall(error),
        overall_variance=None if variance is None else overall(variance),
        kurtosis=float(g.pow(4).mean() / g.square().mean().square()),
        zeros=int((~nonzero).sum()),
    )


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _log_slope(x: Tensor, y: Tensor) -> float:
    """Least-squares slope of ``log y`` on ``log x`` over the finite positive pairs."""
    keep = (x > 0) & (y > 0) & torch.isfinite(y)
    if int(keep.sum()) < 2:
        return math.nan
    lx, ly = x[keep].log(), y[keep].log()
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / lx.square().sum())

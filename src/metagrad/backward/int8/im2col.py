"""Convolution geometry and its channels-last int8 buffers: im2col and the error canvases.

The layer input is quantized straight into a zero-bordered ``N×Hp×Wp×C`` int8 buffer
(:func:`_nhwc_canvas`), viewed with ``as_strided`` as ``N×Ho×Wo×kh×kw×C`` patches and copied
once into a 2-D matrix (:func:`_im2col`). For ``dL/dx`` (the transposed convolution) the error
codes are laid, zero-dilated for stride > 1, into a zero-bordered buffer (:func:`_error_canvas`)
and convolved the same way with the flipped weight (:func:`_flipped_weight_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.backward.int8.intmm import _matrix, _padded, _round_up, _scratch
from metagrad.backward.int8.settings import IntPair


@dataclass(frozen=True)
class _Conv:
    """Shapes of one convolution."""

    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    ho: int
    wo: int
    stride: IntPair
    padding: IntPair
    dilation: IntPair

    @staticmethod
    def of(x_shape, w_shape, stride, padding, dilation) -> _Conv:
        n, c_in, h, w = x_shape
        c_out, _, kh, kw = w_shape
        ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        return _Conv(
            n, c_in, h, w, c_out, kh, kw, ho, wo, tuple(stride), tuple(padding), tuple(dilation)
        )

    @property
    def pointwise(self) -> bool:
        """A 1×1 convolution with stride 1 and no padding: patches are the input itself."""
        return (self.kh, self.kw, self.stride, self.padding) == (1, 1, (1, 1), (0, 0))


def _nhwc_canvas(
    n: int, h: int, w: int, c: int, pad: IntPair, *, device, name: str | None
) -> tuple[Tensor, Tensor]:
    """A zero-bordered int8 ``N×(H+2ph)×(W+2pw)×C`` buffer and its inside as an N×C×H×W view."""
    ph, pw = pad
    hp, wp = h + 2 * ph, w + 2 * pw
    numel = n * hp * wp * c
    flat = (
        _scratch(name, numel, device, torch.int8)
        if name
        else torch.empty(numel, dtype=torch.int8, device=device)
    )
    buf = flat.view(n, hp, wp, c)
    if ph:
        buf[:, :ph].zero_()
        buf[:, ph + h :].zero_()
    if pw:
        buf[:, ph : ph + h, :pw].zero_()
        buf[:, ph : ph + h, pw + w :].zero_()
    return buf, buf[:, ph : ph + h, pw : pw + w].permute(0, 3, 1, 2)


def _im2col(
    canvas: Tensor, kernel: IntPair, out_hw: IntPair, stride: IntPair, dilation: IntPair
) -> Tensor:
    """The int8 patch matrix (rows ``N·Ho·Wo``, columns ``(i, j, c)``) of a padded NHWC buffer.

    Padded with zeros to ``_padded(rows) × round_up(columns)``; lives in the workspace.
    """
    n, _, _, c = canvas.shape
    (kh, kw), (ho, wo) = kernel, out_hw
    rows, cols = n * ho * wo, kh * kw * c
    sn, sh, sw, _ = canvas.stride()
    view = canvas.as_strided(
        (n, ho, wo, kh, kw, c),
        (sn, stride[0] * sh, stride[1] * sw, dilation[0] * sh, dilation[1] * sw, 1),
    )
    mat = _matrix(_padded(rows), _round_up(cols), rows, cols, device=canvas.device, name="patches")
    mat[:rows, :cols].view(n, ho, wo, kh, kw, c).copy_(view)
    return mat


def _flipped_weight_rows(codes: Tensor, rows: int) -> Tensor:
    """The weight codes flipped in space as a ``rows × round_up(Cin)`` matrix.

    Row ``(i', j', co)`` holds ``W[co, :, kh-1-i', kw-1-j']`` (zero rows below): the second
    operand of ``dL/dx``, built by one block copy per kernel tap.
    """
    c_out, c_in, kh, kw = codes.shape
    taps = kh * kw
    per_tap = codes.permute(0, 2, 3, 1).reshape(c_out, taps, c_in)
    mat = _matrix(rows, _round_up(c_in), taps * c_out, c_in, device=codes.device, name="weight")
    blocks = mat[: taps * c_out, :c_in].view(taps, c_out, c_in)
    for tap in range(taps):
        blocks[taps - 1 - tap].copy_(per_tap[:, tap])
    return mat


def _error_placement(g: _Conv):
    """Where the error lands in the buffer of the transposed convolution (see _error_canvas)."""
    hb, wb = g.h + g.dilation[0] * (g.kh - 1), g.w + g.dilation[1] * (g.kw - 1)
    rows = _placement(g.dilation[0] * (g.kh - 1) - g.padding[0], g.stride[0], g.ho, hb)
    cols = _placement(g.dilation[1] * (g.kw - 1) - g.padding[1], g.stride[1], g.wo, wb)
    return hb, wb, rows, cols


def _error_canvas(err_inner: Tensor, g: _Conv) -> Tensor:
    """The error codes placed (stride-dilated) in a zero buffer for the transposed convolution.

    Output ``h`` of ``dL/dx`` reads rows ``h + i'·d`` (``i' = k-1-i``) of an
    ``(H + d(k-1))``-row buffer that holds ``e[ho]`` at row ``d(k-1) - p + ho·s``.
    """
    hb, wb, rows, cols = _error_placement(g)
    flat = _scratch("canvas", g.n * hb * wb * g.c_out, err_inner.device, torch.int8)
    canvas = flat.view(g.n, hb, wb, g.c_out)
    canvas.zero_()
    if rows and cols:
        (r0, r1, rs, h0, h1), (c0, c1, cs, w0, w1) = rows, cols
        canvas[:, r0:r1:rs, c0:c1:cs] = err_inner[:, h0:h1, w0:w1]
    return canvas


def _shared_error_canvas(g: _Conv, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """A zero-bordered error buffer whose inside takes all the error codes directly, or None.

    Only for stride 1 with an output no smaller than the input (e.g. "same" padding), where the
    error's patch matrix (``N·H·W`` rows) can serve both products: ``dL/dx`` and ``dL/dW``
    (:func:`_conv_grad_weight_shared`), which saves the input's patch matrix, unless the
    padding to ``_int_mm``'s sizes makes that ``dL/dW`` product larger than the usual one.
    Returns the buffer and its inside (N×Ho×Wo×Cout).
    """
    if g.pointwise or g.stride != (1, 1) or g.ho * g.wo < g.h * g.w:
        return None
    taps = g.kh * g.kw
    if _round_up(taps * g.c_out) * _round_up(g.c_in) > _padded(g.c_out) * _round_up(taps * g.c_in):
        return None  # padding makes this dL/dW product larger (e.g. an RGB input layer)
    hb, wb, rows, cols = _error_placement(g)
    if not (rows and cols) or (rows[3], rows[4], cols[3], cols[4]) != (0, g.ho, 0, g.wo):
        return None
    (r0, r1, _, _, _), (c0, c1, _, _, _) = rows, cols
    flat = _scratch("canvas", g.n * hb * wb * g.c_out, device, torch.int8)
    canvas = flat.view(g.n, hb, wb, g.c_out)
    canvas[:, :r0].zero_()
    canvas[:, r1:].zero_()
    canvas[:, r0:r1, :c0].zero_()
    canvas[:, r0:r1, c1:].zero_()
    return canvas, canvas[:, r0:r1, c0:c1]


def _placement(offset: int, step: int, count: int, size: int):
    """Buffer slice (start, stop, step) and source range holding ``src[i]`` at ``offset + i·step``.

    Sources that land outside ``[0, size)`` touch no valid output and are dropped.
    """
    first = max(0, -(offset // step))  # smallest i >= 0 with offset + i*step >= 0
    last = min(count, (size - 1 - offset) // step + 1)
    if last <= first:
        return None
    start = offset + first * step
    return start, start + (last - first - 1) * step + 1, step, first, last

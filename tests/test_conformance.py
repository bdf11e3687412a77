"""Conformance with the specifications: every format and scale rule against vectors and
reference rules written here from the definitions, checked bit for bit.

- FP4 E2M1 (OCP MX v1.0): code points {0, 0.5, 1, 1.5, 2, 3, 4, 6}, round to nearest, ties to
  the even code, saturating at 6.
- FP8 E4M3 (OCP FP8, "fn"): max 448, min normal 2^-6, min subnormal 2^-9, no infinities.
- FP8 E5M2 (OCP FP8): max 57344, min normal 2^-14, min subnormal 2^-16 (saturating here).
- E8M0 scales: 2^(e - 127) for e in 0..254, i.e. 2^-127 .. 2^127.
- MX blocks (OCP MX v1.0, section 6.3): 32 elements share X = 2^(floor(log2 amax) - emax_elem),
  emax_elem = 2 (E2M1), 8 (E4M3), 15 (E5M2); elements v / X rounded to the element format,
  values past its largest saturating.
- NVFP4 (NVIDIA): 16 elements share an E4M3 scale s_b = RNE_E4M3((amax_b / 6) / s_t) (at most
  448) under the float32 tensor scale s_t = amax_t / (6 * 448); elements v / (s_b s_t) rounded
  to E2M1, saturating; a block whose s_b rounds to 0 is zeros.
"""

from __future__ import annotations

import math

import pytest
import torch

from metagrad.quant.formats import get_format
from metagrad.quant.quantize import quantize_along
from metagrad.quant.scaling import group_scales
from metagrad.quant.spec import QuantSpec

FP4_CODES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # code m = index: even codes end in 0
EMAX = {"fp4_e2m1": 2, "fp8_e4m3": 8, "fp8_e5m2": 15}
FP32_MAX = 3.4028234663852886e38


def _ref_fp4(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of each ``v`` (float64), ties to the even code, saturating."""
    codes = torch.tensor(FP4_CODES, dtype=torch.float64)
    a = v.abs().clamp(max=6.0)
    dist = (a.unsqueeze(-1) - codes).abs()
    best = dist.min(-1, keepdim=True).values
    ties = dist == best
    even = torch.arange(8) % 2 == 0
    pick = torch.where(ties.sum(-1) > 1, (ties & even).float().argmax(-1), dist.argmin(-1))
    return codes[pick].copysign(v)


def _ref_fp8(v: torch.Tensor, name: str) -> torch.Tensor:
    """Nearest FP8 value of ``v`` (float64): torch's cast after saturating at the maximum."""
    dtype = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[name]
    top = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}[name]
    return v.clamp(-top, top).float().to(dtype).double()


def _ref_element(v: torch.Tensor, name: str) -> torch.Tensor:
    return _ref_fp4(v) if name == "fp4_e2m1" else _ref_fp8(v, name)


def _ref_mx_scale(amax: float, emax: int) -> float:
    """OCP MX's shared scale of a block with largest magnitude ``amax`` > 0."""
    exponent = math.frexp(amax)[1] - 1 - emax  # floor(log2(amax)) - emax
    return math.ldexp(1.0, min(max(exponent, -127), 127))


def _ref_e4m3(r: float) -> float:
    return _ref_fp8(torch.tensor([r], dtype=torch.float64), "fp8_e4m3").item()


# ------------------------------------------------------------------------- element formats


def test_e2m1_code_points_and_ties_to_even():
    fp4 = get_format("fp4_e2m1")
    x = torch.tensor([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 1e30])
    expected = [0, 0, 0.5, 1, 1, 1, 1.5, 2, 2, 2, 3, 4, 4, 4, 6, 6, 6]
    assert fp4.round(x, None).tolist() == expected
    assert fp4.round(-x, None).tolist() == [-v for v in expected]
    assert sorted(set(fp4.round(torch.linspace(0, 8, 8001), None).tolist())) == FP4_CODES


def test_e4m3_and_e5m2_ranges_and_their_edges():
    e4m3, e5m2 = get_format("fp8_e4m3"), get_format("fp8_e5m2")
    x = torch.tensor(
        [448, 449, 464, 1e6, 2**-6, 2**-9, 2**-10, 3 * 2**-11, 1 + 2**-4, 1 + 3 * 2**-4],
        dtype=torch.float64,
    )
    expected = [448, 448, 448, 448, 2**-6, 2**-9, 0, 2**-9, 1, 1.25]
    assert e4m3.round(x, None).tolist() == expected
    y = torch.tensor([57344, 61440, 1e9, 2**-14, 2**-16, 2**-17, 3 * 2**-18], dtype=torch.float64)
    assert e5m2.round(y, None).tolist() == [57344, 57344, 57344, 2**-14, 2**-16, 0, 2**-16]
    for name in ("fp8_e4m3", "fp8_e5m2"):  # every value of the formats, bit for bit
        dtype = torch.float8_e4m3fn if name == "fp8_e4m3" else torch.float8_e5m2
        grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        grid = grid[torch.isfinite(grid)]
        assert torch.equal(get_format(name).round(grid, None), grid)


def test_e8m0_scales_are_the_powers_of_two_of_its_range():
    amax = torch.tensor([1.0, 6.0, 7.99, FP32_MAX, 2.0**-149, 2.0**-100, 12.0], dtype=torch.float64)
    floor = group_scales(amax, 6.0, "e8m0", rounding="floor")
    assert floor.tolist() == [2.0**-2, 1.0, 1.0, 2.0**125, 2.0**-127, 2.0**-102, 2.0]
    up = group_scales(amax, 6.0, "e8m0")
    assert up.tolist() == [2.0**-2, 1.0, 2.0, 2.0**126, 2.0**-127, 2.0**-102, 2.0]
    mantissa, _ = torch.frexp(torch.cat([floor, up]))
    assert torch.all(mantissa == 0.5)  # powers of two only


# ----------------------------------------------------------------------------- MX blocks


def _binade_sweep(dtype=torch.float64) -> torch.Tensor:
    """Block maxima on every binade float32 has, with mantissas on both sides of 1.5 and 1.75
    (where round-up and the OCP floor rule part ways) and at the binade's edges."""
    mantissas = [1.0, 1.0 + 2**-23, 1.25, 1.5, 1.5 + 2**-20, 1.6, 1.75, 1.75 + 2**-20, 1.9]
    mantissas.append(2 - 2**-23)
    values = [math.ldexp(m, e) for e in range(-126, 128) for m in mantissas]
    return torch.tensor([v for v in values if v <= FP32_MAX], dtype=dtype)


@pytest.mark.parametrize("name", ["fp4_e2m1", "fp8_e4m3", "fp8_e5m2"])
def test_mx_floor_scales_follow_the_ocp_rule_on_every_binade(name):
    amax = _binade_sweep()
    max_value = get_format(name).max_value
    floor = group_scales(amax, max_value, "e8m0", rounding="floor")
    expected = torch.tensor([_ref_mx_scale(a, EMAX[name]) for a in amax.tolist()])
    assert torch.equal(floor, expected.to(floor.dtype))
    up = group_scales(amax, max_value, "e8m0")
    mantissa = amax / torch.exp2(torch.floor(torch.log2(amax)))
    top_mantissa = max_value / 2.0 ** EMAX[name]  # 1.5 (E2M1) or 1.75 (E4M3, E5M2)
    inside = (up > 2.0**-126) & (floor > 2.0**-127) & (up < 2.0**127)
    differ = mantissa > top_mantissa
    assert torch.equal(up[inside & differ], 2 * floor[inside & differ])
    assert torch.equal(up[inside & ~differ], floor[inside & ~differ])


@pytest.mark.parametrize("name", ["fp4_e2m1", "fp8_e4m3", "fp8_e5m2"])
def test_mx_blocks_of_32_match_the_ocp_definition_bit_for_bit(name):
    amax = _binade_sweep(torch.float32)
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(len(amax), 32, generator=g) * 2 - 1
    blocks *= amax[:, None]
    blocks[:, 0] = amax  # the block maximum, exactly
    blocks[:, 1] = -amax * 0.999
    spec = QuantSpec(format=name, granularity="block", scale_format="e8m0", scale_rounding="floor")
    q = quantize_along(blocks, spec, (1,))
    scale = torch.tensor([_ref_mx_scale(a, EMAX[name]) for a in amax.tolist()], dtype=torch.float64)
    values = blocks.double() / scale[:, None]
    expected = (_ref_element(values, name) * scale[:, None]).clamp(-FP32_MAX, FP32_MAX).float()
    assert torch.equal(q, expected)


def test_an_mx_block_written_out():
    """One MXFP4 block by hand: amax 7 has X = 2^(2 - 2) = 1; 7 saturates to 6."""
    block = torch.tensor([7.0, -5.0, 2.6, -0.3, 0.25, 0.75, 3.5, 1.25] * 4)
    spec = QuantSpec(format="fp4_e2m1", granularity="block", scale_format="e8m0",
                     scale_rounding="floor")  # fmt: skip
    expected = [6.0, -4.0, 3.0, -0.5, 0.0, 1.0, 4.0, 1.0] * 4
    assert quantize_along(block[None], spec, (1,))[0].tolist() == expected
    # the same block times 2^-20: the scale is 2^-20, the codes the same
    small = quantize_along(block[None] * 2.0**-20, spec, (1,))[0]
    assert (small * 2.0**20).tolist() == expected


# ---------------------------------------------------------------------------------- NVFP4


def _nvfp4_reference(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 of the rows of ``x`` (blocks of 16 along them), from the definition."""
    amax_t = x.abs().max().item()
    s_t = torch.tensor(amax_t, dtype=torch.float32) / (6 * 448)  # a float32 tensor scale
    out = torch.empty_like(x, dtype=torch.float64)
    blocks = x.reshape(x.shape[0], -1, 16)
    for i in range(blocks.shape[0]):
        for j in range(blocks.shape[1]):
            b = blocks[i, j]
            amax_b = b.abs().max().float()
            ratio = ((amax_b / 6) / s_t).item()
            s_b = torch.tensor(_ref_e4m3(ratio), dtype=torch.float32) * s_t  # float32 product
            if s_b.item() == 0:
                out[i, j * 16 : (j + 1) * 16] = 0.0
                continue
            values = (b.float() / s_b).double()
            out[i, j * 16 : (j + 1) * 16] = _ref_fp4(values) * s_b.double()
    return out.float()


def test_nvfp4_blocks_of_16_match_nvidias_definition_bit_for_bit():
    """Block maxima on many binades below the tensor's, with mantissas on both sides of every
    E4M3 rounding boundary, down to blocks whose E4M3 scale rounds to zero."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for k in range(0, 26):
        for m in (1.0, 1.03125, 1.0625, 1.09375, 1.5, 1.6, 1.9375, 1.96875):
            row = (torch.rand(16, generator=g) * 2 - 1) * m * 2.0**-k
            row[3] = m * 2.0**-k
            rows.append(row)
    x = torch.stack(rows).reshape(-1, 64) * 1000.0
    x[0, 0] = 2000.0  # the tensor maximum
    spec = QuantSpec(format="fp4_e2m1", granularity="block", block_size=16, scale_format="e4m3",
                     scale_rounding="nearest")  # fmt: skip
    q = quantize_along(x, spec, (1,))
    assert torch.equal(q, _nvfp4_reference(x))
    assert (q.reshape(-1, 16) == 0).all(1).any()  # some blocks' scales round to zero


def test_an_nvfp4_block_written_out():
    """amax_t = 2688 gives s_t = 1; a block with amax 12 has s_b = 2; one with amax 6.375 has
    the ratio 1.0625, a tie between the E4M3 values 1 and 1.125: to even, 1, so 6.375
    saturates to 6."""
    x = torch.zeros(1, 48)
    x[0, :16] = torch.tensor([2688.0, 100.0] + [0.0] * 14)
    x[0, 16:32] = torch.tensor([12.0, -7.0, 2.5, 0.6] + [0.0] * 12)  # / 2: 6, 3.5, 1.25, 0.3
    x[0, 32:48] = torch.tensor([6.375, -1.25, 0.2] + [0.0] * 13)
    spec = QuantSpec(format="fp4_e2m1", granularity="block", block_size=16, scale_format="e4m3",
                     scale_rounding="nearest")  # fmt: skip
    q = quantize_along(x, spec, (1,))[0]
    assert q[:2].tolist() == [2688.0, 0.0]  # s_b = 448: 100 / 448 = 0.22 rounds to 0
    assert q[16:20].tolist() == [12.0, -8.0, 2.0, 1.0]  # -3.5 and 1.25: ties to even
    assert q[32:35].tolist() == [6.0, -1.0, 0.0]


def test_nvfp4_scales_are_e4m3_values_at_most_448_times_a_float32_tensor_scale():
    amax = torch.tensor([1.0, 6.0, 1000.0, 1e-30], dtype=torch.float32)
    s_t = torch.tensor(1000.0) / (6 * 448)  # float32
    scales = group_scales(amax, 6.0, "e4m3", torch.tensor(1000.0), rounding="nearest")
    expected = [_ref_e4m3(((a / 6) / s_t).item()) for a in amax]
    assert torch.equal(scales, torch.tensor(expected) * s_t)
    assert expected[2] == 448.0 and expected[3] == 0.0

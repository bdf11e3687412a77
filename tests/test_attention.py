"""QuantMultiheadAttention against nn.MultiheadAttention, and transformers off the fused path."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import QuantConfig, QuantMultiheadAttention, QuantSpec, quantize, quantize_
from metagrad.nn import functional as QF
from metagrad.nn.attention import UnfusedTransformerEncoderLayer
from metagrad.nn.layers import QuantLinear

FULL = QuantConfig(grad=QuantSpec())
E, HEADS, N, L, S = 8, 2, 3, 4, 6

# (constructor options, call options, batched, query/key lengths)
CASES = {
    "defaults": ({}, {}, True, (L, S)),
    "self_attention_bool_mask": (
        {"batch_first": True},
        {"need_weights": False, "attn_mask": "bool2"},
        True,
        (L, L),
    ),
    "float_masks_per_head_weights": (
        {"batch_first": True},
        {"attn_mask": "float3", "key_padding_mask": "float", "average_attn_weights": False},
        True,
        (L, S),
    ),
    "kdim_bias_kv_zero_attn": (
        {"kdim": 5, "vdim": 7, "add_bias_kv": True, "add_zero_attn": True},
        {"key_padding_mask": "bool", "attn_mask": "bool2"},
        True,
        (L, S),
    ),
    "no_bias_sdpa": ({"bias": False}, {"need_weights": False}, True, (L, S)),
    "causal_sdpa": (
        {"batch_first": True},
        {"need_weights": False, "attn_mask": "causal", "is_causal": True},
        True,
        (L, L),
    ),
    "causal_with_padding": (
        {"batch_first": True},
        {
            "need_weights": False,
            "attn_mask": "causal",
            "is_causal": True,
            "key_padding_mask": "bool",
        },
        True,
        (L, L),
    ),
    "causal_weights": (
        {},
        {"attn_mask": "causal", "is_causal": True},
        True,
        (L, L),
    ),
    "unbatched": (
        {"batch_first": True, "add_bias_kv": True},
        {"attn_mask": "float3", "key_padding_mask": "float"},
        False,
        (L, S),
    ),
    "unbatched_sdpa": ({}, {"need_weights": False, "attn_mask": "bool2"}, False, (L, S)),
}


def _masks(call: dict, batched: bool, tgt: int, src: int) -> dict:
    """The call options with masks built (seeded by the caller)."""
    batch = N if batched else 1
    out = dict(call)
    kinds = {
        "bool2": lambda: (torch.rand(tgt, src) > 0.7).fill_diagonal_(False),
        "float3": lambda: torch.randn(batch * HEADS, tgt, src),
        "causal": lambda: torch.ones(tgt, src, dtype=torch.bool).triu(1),
        "bool": lambda: torch.arange(src).expand(batch, src) >= src - torch.arange(batch)[:, None],
        "float": lambda: torch.randn(batch, src),
    }
    for key in ("attn_mask", "key_padding_mask"):
        if key in out:
            mask = kinds[out[key]]()
            out[key] = mask if batched or key == "attn_mask" else mask[0]
    return out


def _inputs(module: nn.MultiheadAttention, batched: bool, tgt: int, src: int):
    def shape(length: int, dim: int) -> tuple[int, ...]:
        if not batched:
            return (length, dim)
        return (N, length, dim) if module.batch_first else (length, N, dim)

    if tgt == src and module._qkv_same_embed_dim:
        x = torch.randn(shape(tgt, E))
        return x, x, x
    return (
        torch.randn(shape(tgt, E)),
        torch.randn(shape(src, module.kdim)),
        torch.randn(shape(src, module.vdim)),
    )


def _run(module: nn.Module, inputs, call: dict, seed: int = 1):
    """Outputs and the gradients of the inputs and parameters for a fixed random cotangent."""
    leaves = {id(t): t.clone().requires_grad_() for t in inputs}
    args = [leaves[id(t)] for t in inputs]
    module.zero_grad()
    torch.manual_seed(seed)
    out, weights = module(*args, **call)
    torch.manual_seed(seed + 1)
    loss = (out * torch.randn(out.shape)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape)).sum()
    loss.backward()
    grads = [t.grad for t in leaves.values()] + [p.grad for p in module.parameters()]
    return out, weights, grads


def _pair(options: dict, config: QuantConfig = FULL):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(E, HEADS, **options)
    converted = quantize(nn.Sequential(reference), config)[0]
    return reference, converted


@pytest.mark.parametrize("case", list(CASES))
def test_at_full_precision_it_matches_pytorch_outputs_and_gradients(case):
    options, call, batched, (tgt, src) = CASES[case]
    reference, converted = _pair(options)
    assert isinstance(converted, QuantMultiheadAttention)
    assert isinstance(converted.out_proj, QuantLinear)
    torch.manual_seed(2)
    inputs = _inputs(reference, batched, tgt, src)
    call = _masks(call, batched, tgt, src)
    ref_out, ref_weights, ref_grads = _run(reference, inputs, call)
    out, weights, grads = _run(converted, inputs, call)
    torch.testing.assert_close(out, ref_out)
    assert (weights is None) == (ref_weights is None)
    if weights is not None:
        torch.testing.assert_close(weights, ref_weights)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("need_weights", [False, True])
def test_dropout_draws_like_pytorch_in_training_and_is_off_in_eval(need_weights):
    reference, converted = _pair({"dropout": 0.5, "batch_first": True})
    torch.manual_seed(2)
    inputs = _inputs(reference, True, L, S)
    call = {"need_weights": need_weights}
    ref_out, _, ref_grads = _run(reference, inputs, call)
    out, _, grads = _run(converted, inputs, call)
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)
    converted.eval()
    with torch.no_grad():
        first, second = converted(*inputs, **call)[0], converted(*inputs, **call)[0]
    assert torch.equal(first, second) and not torch.allclose(first, out)


def test_quantized_gradients_reach_the_in_projection():
    """With the output projection left in full precision, only the q/k/v products quantize."""
    two_bits = QuantConfig(grad=QuantSpec(bits=2, rounding="nearest"))
    options = {"batch_first": True, "kdim": 5, "vdim": 5}
    reference, full = _pair(options)
    _, low = _pair(options, {"*.out_proj": None, "*": two_bits})
    assert low.config == two_bits and type(low.out_proj) is not QuantLinear
    torch.manual_seed(2)
    inputs = _inputs(reference, True, L, S)
    _, _, full_grads = _run(full, inputs, {})
    _, _, low_grads = _run(low, inputs, {})
    for got, want in zip(low_grads, full_grads, strict=True):
        if got is low.out_proj.weight.grad or got is low.out_proj.bias.grad:
            torch.testing.assert_close(got, want)
            continue
        assert not torch.allclose(got, want)
        assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.3


def test_built_directly_it_quantizes_both_projections_and_keeps_parameters():
    config = QuantConfig(grad=QuantSpec(bits=4))
    mha = QuantMultiheadAttention(E, HEADS, config=config)
    assert isinstance(mha.out_proj, QuantLinear) and mha.out_proj.config == config
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS))
    params = list(model.parameters())
    quantize_(model, config)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert set(dict(model.named_parameters())) == {
        "0.in_proj_weight",
        "0.in_proj_bias",
        "0.out_proj.weight",
        "0.out_proj.bias",
    }


# ------------------------------------------------------------------- PyTorch's fused paths


def _count_linear(monkeypatch) -> list[int]:
    calls = [0]
    original = QF.linear

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(QF, "linear", counting)
    return calls


def _count(monkeypatch, name: str) -> list[int]:
    calls = [0]
    original = getattr(torch, name)

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, name, counting)
    return calls


def _forward_quantized() -> QuantConfig:
    return QuantConfig(grad=QuantSpec(), weight=QuantSpec(bits=4, granularity="channel"))


def _encoder(norm_first: bool = False) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    layer.norm_first = norm_first
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)


def _regular_path(module: nn.Module, *args, **kwargs):
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return module(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_converted_encoder_skips_the_nested_tensor_path(monkeypatch):
    x = torch.randn(3, 5, 16)
    padding = torch.arange(5).expand(3, 5) >= torch.tensor([[5], [3], [4]])
    original = _encoder().eval()
    nested = _count(monkeypatch, "_nested_tensor_from_mask")
    with torch.no_grad():
        fused = original(x, src_key_padding_mask=padding)
    assert nested[0] == 1 and torch.all(fused[1, 3:] == 0)  # the fused path was taken

    model = _encoder().eval()
    report = quantize_(model, _forward_quantized())
    assert len(report.converted) == 8 and not model.use_nested_tensor
    linear = _count_linear(monkeypatch)
    with torch.no_grad():
        out = model(x, src_key_padding_mask=padding)
        regular = _regular_path(model, x, src_key_padding_mask=padding)
    assert nested[0] == 1 and linear[0] == 2 * 2 * 6  # both passes, 2 layers, 6 products each
    torch.testing.assert_close(out, regular)
    unquantized = _regular_path(original, x, src_key_padding_mask=padding)
    assert not torch.allclose(out, unquantized, atol=1e-3)


@pytest.mark.parametrize("norm_first", [False, True])
def test_converted_encoder_layer_skips_the_fused_layer_kernel(monkeypatch, norm_first):
    x = torch.randn(3, 5, 16)
    original = _encoder(norm_first).layers[0].eval()
    fused = _count(monkeypatch, "_transformer_encoder_layer_fwd")
    with torch.no_grad():
        original(x)
    assert fused[0] == 1

    model = nn.Sequential(_encoder(norm_first).layers[0]).eval()
    quantize_(model, _forward_quantized())
    linear = _count_linear(monkeypatch)
    with torch.no_grad():
        out = model(x)
        regular = _regular_path(model, x)
    assert fused[0] == 1 and linear[0] == 2 * 6
    torch.testing.assert_close(out, regular)
    assert isinstance(model[0], UnfusedTransformerEncoderLayer)
    model.train()
    torch.testing.assert_close(model(x), out)  # the training path is the same computation


def test_converted_decoder_attention_skips_the_native_attention_kernel(monkeypatch):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    original = nn.TransformerDecoder(layer, 2).eval()
    model = quantize(original, _forward_quantized())
    x, memory = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    native = _count(monkeypatch, "_native_multi_head_attention")
    with torch.no_grad():
        original(x, memory)
    assert native[0] > 0
    native[0] = 0
    linear = _count_linear(monkeypatch)
    with torch.no_grad():
        out = model(x, memory)
    assert native[0] == 0 and linear[0] == 2 * 10  # self and cross attention: 4 each, MLP: 2
    assert not torch.allclose(out, original(x, memory), atol=1e-3)

"""GPU paths (run with ``pytest -m cuda``; every test here skips without a CUDA device)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import MetaGrad, QuantConfig, QuantConv2d, QuantSpec, kernels, quantize
from metagrad.backward import fallback_report, int8
from metagrad.cli import main
from metagrad.data import BatchLoader
from metagrad.data.corpus import WindowLoader
from metagrad.models import create_model
from metagrad.quant.quantize import quantize_codes

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def _conv_case(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    x = torch.randn(32, 64, 8, 8, generator=gen).relu().contiguous(memory_format=cl)
    w = (torch.randn(128, 64, 3, 3, generator=gen) * 0.05).contiguous(memory_format=cl)
    e = (torch.randn(32, 128, 8, 8, generator=gen) * 1e-3).contiguous(memory_format=cl)
    return x.to(device), w.to(device), e.to(device)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "sample"])
def test_int8_conv_on_cuda_integer_and_routed_paths_agree_with_the_cpu(granularity):
    config = QuantConfig(grad=QuantSpec(8, "nearest", granularity), backend="int8")
    conv = ((1, 1), (1, 1), (1, 1), 1)
    mask = (True, True, False)
    x, w, e = _conv_case("cpu")
    cpu = int8.conv2d_backward(e, x, w, *conv, config, mask)
    xc, wc, ec = (t.to(CUDA) for t in (x, w, e))
    integer = int8.conv2d_backward(ec, xc, wc, *conv, config, mask)  # torch._int_mm on CUDA
    routed = int8.backend.conv2d_backward_for(ec, xc, wc, *conv, config, mask)  # bf16 on the codes
    for a, b, c in zip(cpu[:2], integer[:2], routed[:2], strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(c.cpu(), a, rtol=1e-3, atol=1e-6)


def test_int8_backend_reports_the_cuda_convolution_route():
    model = quantize(create_model("small_cnn"), QuantConfig(grad=QuantSpec(8), backend="int8"))
    report = fallback_report(model.to(CUDA))
    convs = [n for n, m in model.named_modules() if isinstance(m, QuantConv2d)]
    assert convs and all("bf16" in report[n] for n in convs)


def test_int8_linear_on_cuda_matches_the_simulated_products():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4096, 1024, generator=gen), torch.randn(512, 1024, generator=gen) * 0.02
    e = torch.randn(4096, 512, generator=gen) * 1e-3
    config = QuantConfig(grad=QuantSpec(8), backend="int8")
    mask = (True, True, True)
    args = [t.to(CUDA) for t in (e, x, w)]
    got = int8.linear_backward(*args, config, mask)
    ref = int8.linear_backward_simulated(e, x, w, config, mask)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_backward_on_cuda_matches_float64_on_the_same_codes(dtype):
    torch.manual_seed(0)
    spec = QuantSpec(4, "nearest")
    layer = QuantConv2d(16, 32, 3, padding=1, bias=False, config=QuantConfig(grad=spec)).to(CUDA)
    x = torch.randn(8, 16, 8, 8, device=CUDA, requires_grad=True)
    e = torch.randn(8, 32, 8, 8, device=CUDA, dtype=dtype)
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y.backward(e)
    codes, scale = quantize_codes(e, spec)
    w = layer.weight.detach().to(dtype).double()
    expected = torch.nn.grad.conv2d_input(x.shape, w, codes.double(), padding=1) * scale
    got = x.grad.double()
    torch.testing.assert_close(got, expected, rtol=2**-6, atol=2**-6 * expected.abs().max().item())


@pytest.mark.parametrize("granularity", ["tensor", "channel", "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_quantizer_on_cuda_against_the_reference(granularity, dtype):
    if not kernels.available(CUDA)[0]:
        pytest.skip(kernels.available(CUDA)[1])
    e = torch.randn(64, 128, 8, 8, device=CUDA, dtype=dtype)
    e = e.contiguous(memory_format=torch.channels_last)
    for rounding in ("nearest", "stochastic"):
        spec = QuantSpec(4, rounding, granularity)
        torch.manual_seed(1)
        ref = quantize_codes(e, spec)
        with kernels.compiled(True, device=CUDA):
            torch.manual_seed(1)
            got = quantize_codes(e, spec)
        assert torch.equal(got[1], ref[1])
        if rounding == "nearest":
            assert torch.equal(got[0], ref[0])
        else:  # the same random bytes; a division rounded differently moves a code by one
            diff = (got[0].float() - ref[0].float()).abs()
            assert diff.max() <= 1 and diff.mean() < 1e-4
    torch.manual_seed(2)
    x = torch.full((4096,), 0.3, device=CUDA)
    x[0] = 1.0
    with kernels.compiled(True, device=CUDA):
        mean = torch.stack(
            [torch.mul(*quantize_codes(x, QuantSpec(3, "stochastic"))) for _ in range(200)]
        ).mean()
    assert abs(mean.item() - x.mean().item()) < 1e-3  # unbiased


def test_gpu_batches_equal_cpu_batches():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (300,), generator=gen)
    kwargs = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), shuffle=True, augment=True, seed=3)
    cpu = BatchLoader(images, labels, 64, **kwargs)
    gpu = BatchLoader(images, labels, 64, device=CUDA, **kwargs)
    assert gpu.images.device.type == "cuda"
    for (xa, ya), (xb, yb) in zip(cpu.epoch(1, start=2), gpu.epoch(1, start=2), strict=True):
        assert xb.device.type == "cuda"
        assert torch.equal(ya, yb.cpu())
        torch.testing.assert_close(xb.cpu(), xa, rtol=0, atol=1e-6)


def test_gpu_windows_equal_cpu_windows():
    tokens = torch.randint(0, 50, (5000,), dtype=torch.int32)
    cpu = WindowLoader(tokens, 64, 32, seed=3)
    gpu = WindowLoader(tokens, 64, 32, seed=3, device=CUDA)
    for (xa, ya), (xb, yb) in zip(cpu.epoch(1, start=2), gpu.epoch(1, start=2), strict=True):
        assert xb.device.type == "cuda"
        assert torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt_char", "vit_tiny"])
def test_transformers_train_on_cuda(tmp_path, model):
    out = tmp_path / model
    data = [] if model == "gpt_char" else ["--data", "digits"]
    code = main(
        ["train", "--model", model, "--width", "0.5", *data, "--epochs", "1", "--max-steps", "20",
         "--optimizer", "adam", "--lr", "1e-3", "--weight-decay", "0", "--grad-bits", "4",
         "--grad-rounding", "stochastic", "--method", "metagrad", "--device", "cuda",
         "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["amp"] == "bfloat16" and summary["device"].startswith("cuda")
    assert summary["steps"] == 20
    if model == "gpt_char":
        assert summary["final_test_bpc"] < 6.0  # from about log2(103) = 6.7 at the start


def test_metagrad_step_on_cuda_with_compiled_kernels():
    if not kernels.available(CUDA)[0]:
        pytest.skip(kernels.available(CUDA)[1])
    results = []
    for device in ("cpu", CUDA):
        torch.manual_seed(0)
        config = QuantConfig(grad=QuantSpec(8))
        model = quantize(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)), config)
        model = model.to(device)
        opt = MetaGrad(model, lr=0.1, momentum=0.9, hyper_lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 16, generator=gen), torch.randint(0, 4, (64,), generator=gen)
        x, y = x.to(device), y.to(device)
        kind = torch.device(device).type
        with kernels.compiled(True, device=device):
            for _ in range(4):

                def closure(model=model, opt=opt, x=x, y=y, kind=kind):
                    opt.zero_grad()
                    with torch.autocast(kind, dtype=torch.bfloat16):
                        loss = F.cross_entropy(model(x).float(), y)
                    loss.backward()
                    return loss

                opt.step(closure)
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.02)


@pytest.mark.slow
def test_train_command_on_cuda_defaults_to_bf16_and_compiled_kernels(tmp_path):
    out = tmp_path / "run"
    code = main(
        ["train", "--model", "small_cnn", "--data", "digits", "--epochs", "1", "--grad-bits",
         "4", "--grad-rounding", "stochastic", "--device", "cuda", "--out", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["amp"] == "bfloat16" and summary["device"].startswith("cuda")
    assert summary["compile"] in ("kernels", "off")


@pytest.mark.parametrize("name", ["default", "int8", "rht-nvfp4"])
def test_compiled_model_trains_on_cuda_under_bf16(name):
    """``torch.compile(fullgraph=True)`` of a converted transformer on CUDA (Triton, inductor's
    ``_int_mm`` for the ``int8`` backend): finite, decreasing loss."""
    from metagrad.quant import preset_config

    configs = {
        "default": QuantConfig(),
        "int8": QuantConfig(grad=QuantSpec(8, "stochastic"), backend="int8"),
    }
    torch.manual_seed(0)
    model = create_model("gpt_char", width=0.25, num_classes=64, in_channels=64).to(CUDA)
    model = quantize(model, configs.get(name) or preset_config(name))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.randint(0, 64, (2, 8, 32), device=CUDA)
    losses = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compiled(x)
        loss = F.cross_entropy(out.reshape(-1, 64).float(), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses

"""A vision model from Hugging Face, converted by ``metagrad.quantize_``, in a plain PyTorch loop.

Shows the pattern for any ``nn.Module`` of another library (a timm or torchvision model works the
same way; this example uses ``transformers``' ConvNeXt from a tiny random config so that it runs
where torchvision is not installed, with no download): convert once, then train with bf16
autocast, first with ``torch.optim.AdamW``, then with ``metagrad.MetaGrad``, whose ``step`` takes
the closure that runs the forward and backward. CPU, random data, a few seconds.

Run: ``python examples/hand_written_loop.py`` (needs ``pip install -e ".[integrations]"``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import ConvNextConfig, ConvNextForImageClassification

import metagrad as mg

STEPS = 8


def make_model(seed: int = 0) -> tuple[nn.Module, mg.ConversionReport]:
    """A two-stage ConvNeXt for 32x32 images and 4 classes, quantized to the NVFP4 preset."""
    torch.manual_seed(seed)
    config = ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=4
    )
    model = ConvNextForImageClassification(config)
    report = mg.quantize_(model, mg.quant.preset_config("rht-nvfp4"))
    return model, report


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed batch of random images and labels: the loop fits it, so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(pixel_values=x).logits
    return nn.functional.cross_entropy(logits.float(), y)


def train_plain(steps: int = STEPS) -> dict:
    """AdamW on the converted model; the per-step losses."""
    model, report = make_model()
    x, y = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"model": model, "report": report, "optimizer": opt, "losses": losses}


def train_metagrad(steps: int = STEPS) -> dict:
    """MetaGrad (Adam base rule) on the converted model; the per-step losses."""
    model, report = make_model()
    x, y = batch()
    opt = mg.MetaGrad(model, lr=3e-3, base="adam", hyper_lr=1e-3)
    losses = []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
    return {"model": model, "report": report, "optimizer": opt, "losses": losses}


def main() -> dict:
    plain = train_plain()
    print(plain["report"])
    meta = train_metagrad()
    for name, run in (("AdamW", plain), ("MetaGrad", meta)):
        print(f"{name:>8}: loss " + " ".join(f"{v:.3f}" for v in run["losses"]))
    return {"plain": plain, "metagrad": meta}


if __name__ == "__main__":
    main()

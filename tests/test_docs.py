"""The documentation holds together: its links resolve and its code examples run."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", _prose(path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _code(path: Path, language: str) -> list[str]:
    return [m[2] for m in FENCE.finditer(path.read_text()) if m[1] == language]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    """Every relative link names an existing file, and every anchor one of its headings."""
    for target in LINK.findall(_prose(doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: {target} does not exist"
        if anchor:
            assert anchor in _anchors(file), f"{doc.name}: {target} names no heading"


def test_no_link_to_moved_pages():
    for doc in DOCS:
        text = doc.read_text()
        assert "METHOD.md" not in text and "python benchmarks/" not in text, doc.name


@pytest.mark.slow
def test_readme_example_runs():
    """The README's example, on one small batch of random images."""
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 1]))]
    scope = {"loader": loader}
    for code in _code(ROOT / "README.md", "python"):
        exec(compile(code, "README.md", "exec"), scope)
    assert type(scope["model"].classifier).__name__ == "QuantLinear"
    assert scope["opt"].state_dict()["state"]


EXERCISE = """
import torch
from torch import nn

import metagrad as mg
import my_backend, my_layers, my_methods, my_models, my_transforms
from metagrad.quant import fake_quantize, preset_config

x = torch.randn(4, 64)
fp6 = mg.QuantSpec(format="fp6_e3m2", granularity="block", block_size=32, scale_format="e8m0")
signs = mg.QuantSpec(format="fp8_e4m3", granularity="block", transform="signs")
for spec in (fp6, signs):
    assert fake_quantize(x, spec, 1).shape == x.shape
config = preset_config("mxfp6-wgrad")
assert config.grad_for_weight_grad.format == "fp6_e3m2"
for name, shape in (("tiny_mlp", (2, 1, 8, 8)), ("small_cnn", (2, 1, 8, 8))):
    model = mg.create_model(name, in_channels=1)
    mg.quantize_(model, mg.QuantConfig(grad=mg.QuantSpec(bits=4), backend="float64"))
    model(torch.randn(shape)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
net = nn.Sequential(my_layers.Scale(4), nn.ReLU(), my_layers.Scale(4))
report = mg.quantize_(net, mg.QuantConfig(grad=mg.QuantSpec(bits=4)))
assert len(report.converted) == 2 and not report.unconverted
net(torch.randn(3, 4)).sum().backward()
print("ok")
"""


@pytest.mark.slow
def test_extending_examples_run(tmp_path):
    """Each module of docs/extending.md, written out as it stands, registers and works (in a
    fresh process: the registrations are global)."""
    modules = 0
    for code in _code(ROOT / "docs" / "extending.md", "python"):
        name = re.match(r"# (my_\w+\.py)\n", code)
        if name:
            (tmp_path / name[1]).write_text(code)
            modules += 1
    assert modules == 6
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT / 'src'}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", EXERCISE], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
    command = _code(ROOT / "docs" / "extending.md", "bash")[-1].replace("\\\n", " ").split()
    assert command[:2] == ["metagrad", "train"]
    out = tmp_path / "runs" / "mine"
    command = [sys.executable, "-m", "metagrad", *command[1:], "--max-steps", "2", "--no-progress"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "summary.json").is_file()

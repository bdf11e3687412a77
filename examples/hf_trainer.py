"""The Hugging Face ``Trainer`` on models converted by ``metagrad.quantize_``: GPT-2 and BERT.

Both models come from tiny random configs (no download) and train a few steps on a fixed set of
random tokens, with the optimizer the ``Trainer`` builds (AdamW): quantized backward passes need
nothing else from the ``Trainer``. GPT-2's linear layers are ``transformers``' own ``Conv1D``;
the report printed for it lists what ``quantize_`` converted.

MetaGrad does not work with the ``Trainer``: its loop calls ``optimizer.step()`` without a
closure (after ``training_step`` has run the forward and backward), and MetaGrad must run the
forward itself with the next weights substituted, so ``MetaGrad.step`` raises its
"requires a closure" ``TypeError`` at the first step. Use MetaGrad in a loop of your own
(``examples/hand_written_loop.py``) or with Lightning (``examples/lightning_metagrad.py``).

Run: ``python examples/hf_trainer.py`` (needs ``pip install -e ".[integrations]"``).
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

import metagrad as mg

STEPS = 6
CONFIG = mg.QuantConfig(grad=mg.QuantSpec(bits=4, rounding="stochastic"))


class RandomTokens(torch.utils.data.Dataset):
    """``n`` fixed random sequences: causal-LM examples, or classification examples."""

    def __init__(self, n: int, length: int, vocab: int, num_labels: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = (
            None if num_labels is None else torch.randint(0, num_labels, (n,), generator=g)
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i] if self.labels is None else self.labels[i]
        return {"input_ids": self.ids[i], "labels": labels}


def gpt2() -> tuple[nn.Module, RandomTokens]:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config), RandomTokens(8, 32, 100)


def bert() -> tuple[nn.Module, RandomTokens]:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config), RandomTokens(8, 16, 100, num_labels=2)


def train(model: nn.Module, data: RandomTokens, out: str, steps: int = STEPS) -> dict:
    """Convert ``model``, train it ``steps`` steps with the ``Trainer``; report and losses."""
    report = mg.quantize_(model, CONFIG)
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=len(data),
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"model": model, "report": report, "trainer": trainer, "losses": losses}


def main() -> dict:
    runs = {}
    with tempfile.TemporaryDirectory() as out:
        for name, make in (("gpt2", gpt2), ("bert", bert)):
            runs[name] = train(*make(), out=f"{out}/{name}")
            print(f"{name}: {runs[name]['report']}")
            print(f"{name}: loss " + " ".join(f"{v:.3f}" for v in runs[name]["losses"]))
    return runs


if __name__ == "__main__":
    main()

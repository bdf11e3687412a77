"""Character corpora for language modelling, from local text only.

- :func:`load_char_corpus` reads the text of Python's own documentation (``pydoc_data``, shipped
  with CPython: the default, ``"pydoc"``) or any UTF-8 text file, and encodes it with its
  vocabulary: the sorted set of its characters. The first 90% of the characters are the train
  split, the rest the validation split.
- :class:`WindowLoader` draws batches of random train windows, reproducibly and resumably, like
  :class:`~metagrad.data.BatchLoader` (and with its ``shard=(rank, world_size)``).
- :meth:`CharCorpus.eval_windows` cuts the validation split into consecutive windows.

Every problem with a corpus raises :class:`~metagrad.data.DatasetError` with one line that names
the source and what was expected.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metagrad.data.errors import DatasetError, dataset_error, format_size
from metagrad.data.loader import seeded_generator
from metagrad.data.safe_read import read_file
from metagrad.parallel.distributed import shard_bounds

__all__ = [
    "MAX_TEXT_BYTES",
    "MAX_VOCAB",
    "PYDOC",
    "VALIDATION_FRACTION",
    "CharCorpus",
    "WindowLoader",
    "load_char_corpus",
    "pydoc_text",
]

PYDOC = "pydoc"
"""Source name of the default corpus: the text of Python's documentation topics."""
VALIDATION_FRACTION = 0.1
"""Share of the characters, at the end of the text, held out for validation."""
MAX_TEXT_BYTES = 64 << 20
"""Largest text file read (its characters are held in memory as 32-bit ids)."""
MAX_VOCAB = 65_536
"""Most distinct characters a corpus may have. The model holds a row per character in its
embedding and output layers, and every position of a batch a logit per character, so a text of
all 1.1M Unicode code points would need tens of GB; 65,536 covers the Basic Multilingual Plane
(every living script) and is refused, before anything is built, above that."""
_WINDOW_STREAM = 3  # distinct from the image loader's streams


def pydoc_text() -> str:
    """The topics of Python's documentation (``pydoc_data.topics``), joined in name order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics))


@dataclass(frozen=True, eq=False)
class CharCorpus:
    """A text encoded as int32 character ids: ``train`` and ``test`` (validation) splits."""

    train: Tensor
    test: Tensor
    vocab: str
    """The characters of the text, sorted; a character's id is its index here."""
    source: str
    sha256: str
    """Of the text's UTF-8 bytes."""

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> Tensor:
        """``text`` as int64 ids; every character must be in the vocabulary."""
        index = {c: i for i, c in enumerate(self.vocab)}
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.int64)
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Tensor) -> str:
        """The text of a 1-D tensor of ids."""
        return "".join(self.vocab[i] for i in ids.tolist())

    def signature(self) -> dict[str, Any]:
        """What a resumed run's corpus must match: its text (hash), vocabulary and splits."""
        return {
            "vocab": self.vocab,
            "train": len(self.train),
            "test": len(self.test),
            "sha256": self.sha256,
        }

    def check_context(self, context: int) -> None:
        """Refuse a corpus whose splits cannot hold one window of ``context`` + 1 characters."""
        need = context + 1
        for split in ("train", "test"):
            have = len(getattr(self, split))
            if have < need:
                total = len(self.train) + len(self.test)
                raise dataset_error(
                    self.source,
                    f"{total} characters give a {split} split of {have}, fewer than one window "
                    f"of context {context} + 1 = {need} needs; the text must be longer",
                )

    def eval_windows(self, context: int) -> tuple[Tensor, Tensor]:
        """The validation split as N×``context`` inputs and targets (the next characters).

        Consecutive, non-overlapping windows; the last ``< context`` characters are left out.
        """
        self.check_context(context)
        n = (len(self.test) - 1) // context
        x = self.test[: n * context].view(n, context)
        y = self.test[1 : n * context + 1].view(n, context)
        return x.long(), y.long()


def load_char_corpus(
    source: str | os.PathLike[str] | None = None, *, val_fraction: float = VALIDATION_FRACTION
) -> CharCorpus:
    """The corpus of ``source``: ``None`` or ``"pydoc"`` (built in), or a UTF-8 text file."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if source is None or str(source) == PYDOC:
        name, text = PYDOC, pydoc_text()
        raw = text.encode("utf-8")
    else:
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise dataset_error(path, "no such file; expected a UTF-8 text file (or 'pydoc')")
        if not path.is_file():
            raise dataset_error(path, "expected a UTF-8 text file, not a directory or special file")
        raw = read_file(path, MAX_TEXT_BYTES, "text file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise dataset_error(
                path,
                f"expected UTF-8 text; byte 0x{raw[exc.start]:02x} at offset {exc.start} is not "
                f"UTF-8 ({format_size(len(raw))} file)",
            ) from None
    if not text:
        raise dataset_error(name, "is empty; expected UTF-8 text")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_codes = np.unique(codes)  # sorted code points: the order of sorted(set(text))
    if len(vocab_codes) > MAX_VOCAB:
        raise dataset_error(
            name,
            f"has {len(vocab_codes):,} distinct characters, more than the {MAX_VOCAB:,} a "
            "character vocabulary may hold (metagrad.data.corpus.MAX_VOCAB)",
        )
    if len(vocab_codes) < 2:
        raise dataset_error(
            name, f"has only 1 distinct character ({text[0]!r}); expected at least 2"
        )
    ids = torch.from_numpy(np.searchsorted(vocab_codes, codes).astype(np.int32))
    split = len(ids) - max(1, round(len(ids) * val_fraction))
    return CharCorpus(
        train=ids[:split].clone(),
        test=ids[split:].clone(),
        vocab="".join(map(chr, vocab_codes.tolist())),
        source=name,
        sha256=hashlib.sha256(raw).hexdigest(),
    )


class WindowLoader:
    """Batches of random windows of ``context`` + 1 characters from a 1-D tensor of ids.

    Batch ``i`` of epoch ``e`` takes ``batch_size`` window starts, uniform over the text, drawn
    with a generator seeded from ``(seed, e, i)``, so ``epoch(e, start=k)`` yields exactly the
    batches ``k, k+1, ...`` of an uninterrupted ``epoch(e)``. An epoch is ``windows`` windows
    (default ``len(tokens) // context``: about one pass over the text) in full batches, at
    least one.

    ``device``: the ids are moved there once and windows are gathered there; the draws stay on
    the CPU generators, so the batches are the same as on the CPU.

    ``shard=(rank, world_size)``: each batch is drawn as for one process, and this rank gets its
    ``rank``-th contiguous part of the windows.
    """

    def __init__(
        self,
        tokens: Tensor,
        context: int,
        batch_size: int,
        *,
        windows: int | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        for name, value in (("context", context), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if tokens.dim() != 1 or tokens.is_floating_point():
            raise ValueError(f"tokens must be 1-D integer ids, got shape {tuple(tokens.shape)}")
        if len(tokens) < context + 1:
            raise DatasetError(
                f"{len(tokens)} characters are fewer than one window of {context} + 1 needs"
            )
        rank, world_size = shard
        if not 0 <= rank < world_size:
            raise ValueError(f"shard must be (rank, world_size), 0 <= rank < world_size: {shard}")
        if batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} is smaller than the {world_size} shards")
        self.tokens = tokens if device is None else tokens.to(device)
        self.context, self.batch_size, self.seed = context, batch_size, seed
        self.windows = len(tokens) // context if windows is None else windows
        if self.windows < 1:
            raise ValueError(f"windows must be >= 1, got {self.windows}")
        self.shard = (rank, world_size)
        self._offsets = torch.arange(context + 1, device=self.tokens.device)

    def global_batch_size(self, i: int) -> int:
        """Number of windows in batch ``i`` over all shards."""
        return self.batch_size

    def __len__(self) -> int:
        return max(1, self.windows // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)``: B×``context`` int64 ids and the ids that follow each, from batch
        ``start`` on."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be in [0, {len(self)}], got {start}")
        return self._batches(epoch, start)

    def starts(self, epoch: int, i: int) -> Tensor:
        """The window starts of batch ``i`` of ``epoch`` (all shards)."""
        generator = seeded_generator(self.seed, epoch, _WINDOW_STREAM, i)
        high = len(self.tokens) - self.context  # exclusive: the last window ends at the end
        return torch.randint(0, high, (self.batch_size,), generator=generator)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(start, len(self)):
            starts = self.starts(epoch, i)
            if self.shard[1] > 1:
                lo, hi = shard_bounds(len(starts), *self.shard)
                starts = starts[lo:hi]
            index = starts.to(self.tokens.device)[:, None] + self._offsets
            windows = self.tokens[index].long()
            yield windows[:, :-1], windows[:, 1:]

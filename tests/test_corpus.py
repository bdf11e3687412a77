"""The character corpus: local sources, vocabulary, split, windows, resumable batches, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metagrad.data import DatasetError
from metagrad.data.corpus import PYDOC, CharCorpus, WindowLoader, load_char_corpus, pydoc_text

TEXT = "hello world, hello corpus!\n" * 40  # 1080 characters


def _write(tmp_path: Path, content: str | bytes, name: str = "text.txt") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def test_the_default_corpus_is_pythons_documentation() -> None:
    corpus = load_char_corpus()
    text = pydoc_text()
    assert corpus.source == PYDOC and len(text) > 100_000
    assert corpus.vocab == "".join(sorted(set(text)))
    assert len(corpus.train) + len(corpus.test) == len(text)
    assert len(corpus.test) == round(len(text) * 0.1)
    assert corpus.decode(corpus.train[:200]) == text[:200]
    assert load_char_corpus(PYDOC).sha256 == corpus.sha256


def test_split_by_position_and_vocabulary(tmp_path: Path) -> None:
    text = "ba\u00e9\u4e2d" * 25 + "zz"  # non-ASCII characters, 102 in all
    corpus = load_char_corpus(_write(tmp_path, text), val_fraction=0.25)
    assert corpus.vocab == "".join(sorted(set(text))) == "abz\u00e9\u4e2d"
    assert corpus.train.dtype == torch.int32
    assert corpus.decode(corpus.train) == text[: 102 - 26]
    assert corpus.decode(corpus.test) == text[102 - 26 :]
    assert torch.equal(corpus.encode(text[:10]), corpus.train[:10].long())
    with pytest.raises(ValueError, match="not in the vocabulary"):
        corpus.encode("q")
    again = load_char_corpus(tmp_path / "text.txt", val_fraction=0.25)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.test, corpus.test)
    assert again.signature() == corpus.signature()
    assert again.signature()["vocab"] == corpus.vocab


def _loader(corpus: CharCorpus, **kwargs) -> WindowLoader:
    return WindowLoader(corpus.train, 8, 6, **{"seed": 3, **kwargs})


def test_windows_are_text_and_its_next_characters(tmp_path: Path) -> None:
    corpus = load_char_corpus(_write(tmp_path, TEXT))
    loader = _loader(corpus)
    assert len(loader) == (len(corpus.train) // 8) // 6
    train_text = corpus.decode(corpus.train)
    for x, y in loader.epoch(0):
        assert x.shape == y.shape == (6, 8) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y, strict=True):
            window = corpus.decode(row_x) + corpus.decode(row_y[-1:])
            assert window in train_text


def test_window_batches_are_seeded_and_resume_exactly(tmp_path: Path) -> None:
    corpus = load_char_corpus(_write(tmp_path, TEXT))
    loader = _loader(corpus)
    first = list(loader.epoch(1))
    again = _loader(corpus).epoch(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], next(iter(loader.epoch(2)))[0])
    assert not torch.equal(first[0][0], next(iter(_loader(corpus, seed=4).epoch(1)))[0])
    for start in (0, 1, len(loader) - 1, len(loader)):
        tail = list(loader.epoch(1, start=start))
        assert len(tail) == len(loader) - start
        for (x, y), (a, b) in zip(tail, first[start:], strict=True):
            assert torch.equal(x, a) and torch.equal(y, b)
    starts = torch.cat([loader.starts(1, i) for i in range(len(loader))])
    assert starts.min() >= 0 and starts.max() <= len(corpus.train) - 9


def test_shards_split_each_batch(tmp_path: Path) -> None:
    corpus = load_char_corpus(_write(tmp_path, TEXT))
    whole = list(_loader(corpus).epoch(0))
    parts = [list(_loader(corpus, shard=(r, 4)).epoch(0)) for r in range(4)]
    for i, (x, _) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
    assert [len(p[0][0]) for p in parts] == [2, 2, 1, 1]
    assert _loader(corpus, shard=(1, 4)).global_batch_size(0) == 6


def test_a_loader_on_a_device_yields_the_same_windows(tmp_path: Path) -> None:
    corpus = load_char_corpus(_write(tmp_path, TEXT))
    here, there = _loader(corpus), _loader(corpus, device="cpu")  # the CUDA path, on the CPU
    for (xa, ya), (xb, yb) in zip(here.epoch(2, start=1), there.epoch(2, start=1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_an_epoch_is_a_fixed_number_of_windows(tmp_path: Path) -> None:
    corpus = load_char_corpus(_write(tmp_path, TEXT))
    assert len(WindowLoader(corpus.train, 8, 6, windows=60)) == 10
    assert len(WindowLoader(corpus.train, 8, 1000)) == 1  # at least one batch


def test_evaluation_windows_are_consecutive(tmp_path: Path) -> None:
    corpus = load_char_corpus(_write(tmp_path, TEXT))
    x, y = corpus.eval_windows(10)
    n = (len(corpus.test) - 1) // 10
    assert x.shape == y.shape == (n, 10)
    assert corpus.decode(x.flatten()) == corpus.decode(corpus.test[: n * 10])
    assert corpus.decode(y.flatten()) == corpus.decode(corpus.test[1 : n * 10 + 1])


def test_loader_rejects_bad_arguments(tmp_path: Path) -> None:
    corpus = load_char_corpus(_write(tmp_path, TEXT))
    with pytest.raises(ValueError, match="context"):
        WindowLoader(corpus.train, 0, 4)
    with pytest.raises(ValueError, match="batch_size"):
        WindowLoader(corpus.train, 8, True)
    with pytest.raises(ValueError, match="shard"):
        WindowLoader(corpus.train, 8, 4, shard=(2, 2))
    with pytest.raises(ValueError, match="smaller than"):
        WindowLoader(corpus.train, 8, 2, shard=(0, 3))
    with pytest.raises(ValueError, match="start"):
        next(WindowLoader(corpus.train, 8, 4).epoch(0, start=10_000))
    with pytest.raises(DatasetError, match="fewer than one window"):
        WindowLoader(corpus.train[:5], 8, 4)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("", "is empty"),
        (b"caf\xe9 au lait", "expected UTF-8 text; byte 0xe9 at offset 3"),
        ("aaaaaaa", "only 1 distinct character"),
    ],
    ids=["missing", "empty", "latin-1", "one-character"],
)
def test_bad_text_files_give_one_line_errors(tmp_path: Path, content, message) -> None:
    path = tmp_path / "missing.txt" if content is None else _write(tmp_path, content)
    with pytest.raises(DatasetError, match=message) as info:
        load_char_corpus(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_directory_is_not_a_text_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="expected a UTF-8 text file"):
        load_char_corpus(tmp_path)


def test_a_text_too_short_for_the_context_is_refused(tmp_path: Path) -> None:
    corpus = load_char_corpus(_write(tmp_path, TEXT[:300]))  # test split: 30 characters
    corpus.check_context(29)
    with pytest.raises(DatasetError, match=r"test split of 30, fewer than one window") as info:
        corpus.check_context(30)
    assert str(tmp_path / "text.txt") in str(info.value)
    with pytest.raises(DatasetError, match="train split"):
        load_char_corpus(_write(tmp_path, TEXT[:300]), val_fraction=0.9).check_context(30)

"""Tests for metagrad.data: dataset readers, cache, safety, download and the batch pipeline."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shlex
import struct
import tarfile
import tracemalloc
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from metagrad import data
from metagrad.data import (
    CIFAR10_CLASSES,
    BatchLoader,
    DatasetError,
    ImageDataset,
    augment_batch,
    download_cifar10,
    image_folder,
    load_cifar10,
    load_digits_dataset,
    needs_download,
    normalize,
    release,
)
from metagrad.data.safe_read import read_bounded

SHARED_ZIP = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.zip"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
RELEASE_CLASSES = ["plane", "car", "bird"]  # deliberately unsorted: batches.meta order rules


@pytest.fixture(autouse=True)
def _private_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's default cache inside its tmp_path (never ~/.cache)."""
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "default-cache"))


# --------------------------------------------------------------------------- fake python release


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 strings, as in the real (Python 2) CIFAR-10 release."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("ascii"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _dumps(obj: object, flavor: str = "py2") -> bytes:
    if flavor == "py2":
        buffer = io.BytesIO()
        _Py2Pickler(buffer, protocol=2).dump(obj)
        return buffer.getvalue()
    return pickle.dumps(obj, protocol=int(flavor))


def _release_files(
    flavor: str = "py2", n: int = 3
) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Tiny fake release: ({file name: pickle bytes}, expected arrays)."""
    rng = np.random.default_rng(0)
    files, rows, labels = {}, {"train": [], "test": []}, {"train": [], "test": []}
    for name in [*TRAIN_BATCHES, "test_batch"]:
        split = "test" if name == "test_batch" else "train"
        batch = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch_labels = rng.integers(0, len(RELEASE_CLASSES), n).tolist()
        files[name] = _dumps(
            {
                b"batch_label": name.encode(),
                b"labels": batch_labels,
                b"data": batch,
                b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
            },
            flavor,
        )
        rows[split].append(batch)
        labels[split].append(batch_labels)
    meta = {b"label_names": [c.encode() for c in RELEASE_CLASSES], b"num_cases_per_batch": n}
    files["batches.meta"] = _dumps(meta, flavor)
    expected = {
        f"{split}_images": np.concatenate(rows[split]).reshape(-1, 3, 32, 32) for split in rows
    } | {f"{split}_labels": np.concatenate(labels[split]) for split in labels}
    return files, expected


def _write_release_dir(root: Path, files: dict[str, bytes]) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return folder


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _write_release_tar(path: Path, files: dict[str, bytes]) -> Path:
    return _write_tar(path, {f"cifar-10-batches-py/{n}": raw for n, raw in files.items()})


def _assert_matches(dataset: ImageDataset, expected: dict[str, np.ndarray]) -> None:
    for field, array in expected.items():
        tensor = getattr(dataset, field)
        assert tensor.dtype == (torch.uint8 if "images" in field else torch.int64)
        assert np.array_equal(tensor.numpy(), array), field


# --------------------------------------------------------------------------- python release


@pytest.mark.parametrize("layout", ["folder", "folder-parent", "tar", "tar-parent"])
def test_python_release_layouts(tmp_path: Path, layout: str) -> None:
    files, expected = _release_files()
    if layout.startswith("folder"):
        folder = _write_release_dir(tmp_path / "data", files)
        path = folder if layout == "folder" else folder.parent
    else:
        archive = _write_release_tar(tmp_path / "data" / "cifar-10-python.tar.gz", files)
        path = archive if layout == "tar" else archive.parent
    dataset = load_cifar10(path, cache_dir=tmp_path / "cache")
    assert dataset.classes == RELEASE_CLASSES
    assert dataset.train_images.shape == (15, 3, 32, 32)
    assert dataset.test_images.shape == (3, 3, 32, 32)
    _assert_matches(dataset, expected)
    assert dataset.mean == data.CIFAR10_MEAN and dataset.std == data.CIFAR10_STD


def test_python_release_pixel_layout(tmp_path: Path) -> None:
    """Rows are 1024 red, then 1024 green, then 1024 blue values, each row-major 32×32."""
    files, _ = _release_files()
    row = np.zeros((1, 3072), dtype=np.uint8)
    row[0, 0], row[0, 1024 + 33], row[0, 2048 + 1023] = 10, 20, 30
    files["data_batch_1"] = _dumps({b"data": row, b"labels": [2]})
    dataset = load_cifar10(_write_release_dir(tmp_path, files))
    image = dataset.train_images[0]
    assert image[0, 0, 0] == 10 and image[1, 1, 1] == 20 and image[2, 31, 31] == 30
    assert int(image.sum()) == 60 and int(dataset.train_labels[0]) == 2


@pytest.mark.parametrize("flavor", ["py2", "2", "4", "5"])
def test_python_release_pickle_flavors(tmp_path: Path, flavor: str) -> None:
    files, expected = _release_files(flavor)
    _assert_matches(load_cifar10(_write_release_dir(tmp_path, files)), expected)


# --------------------------------------------------------------------------- image folders


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_folder_members() -> tuple[dict[str, bytes], dict[str, np.ndarray], list[str]]:
    """({relative path: PNG bytes}, expected arrays, classes); one image is grayscale."""
    rng = np.random.default_rng(1)
    members: dict[str, bytes] = {}
    expected: dict[str, list] = {
        "train_images": [],
        "train_labels": [],
        "test_images": [],
        "test_labels": [],
    }
    classes = ["ant", "cat", "dog"]
    for split, count in (("train", 2), ("test", 1)):
        for label, name in enumerate(classes):
            for i in range(count):
                if (split, name, i) == ("train", "cat", 1):
                    gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
                    members[f"{split}/{name}/{i:04d}.png"] = _png(gray)
                    pixels = np.repeat(gray[:, :, None], 3, axis=2)
                else:
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    members[f"{split}/{name}/{i:04d}.png"] = _png(pixels)
                expected[f"{split}_images"].append(pixels.transpose(2, 0, 1))
                expected[f"{split}_labels"].append(label)
    # Written in reverse so that neither class nor file order comes from the writing order.
    members = dict(reversed(members.items()))
    return members, {k: np.array(v) for k, v in expected.items()}, classes


def _write_dir(root: Path, members: dict[str, bytes]) -> Path:
    for rel, raw in members.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(raw)
    return root


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    return path


@pytest.mark.parametrize("layout", ["dir", "zip", "zip-with-top-folder"])
def test_image_folder_layouts(tmp_path: Path, layout: str) -> None:
    members, expected, classes = _image_folder_members()
    if layout == "dir":
        path = _write_dir(tmp_path / "images", members | {"train/README.txt": b"ignored"})
    else:
        top = "cifar10/" if layout == "zip-with-top-folder" else ""
        extra = {f"{top}README.txt": b"ignored", "__MACOSX/._junk": b"ignored"}
        path = _write_zip(tmp_path / "images.zip", {top + k: v for k, v in members.items()} | extra)
    dataset = load_cifar10(path, cache_dir=tmp_path / "cache")
    assert dataset.classes == classes
    _assert_matches(dataset, expected)


# --------------------------------------------------------------------------- cache


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Wrap image_folder.<name> so that calls are counted in the returned one-element list."""
    calls = [0]
    original = getattr(image_folder, name)

    def counted(*args: object) -> object:
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(image_folder, name, counted)
    return calls


def _assert_same(a: ImageDataset, b: ImageDataset) -> None:
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert (a.classes, a.mean, a.std) == (b.classes, b.mean, b.std)


def _refuse(*args: object) -> None:
    raise AssertionError("decoded again instead of using the cache")


@pytest.mark.parametrize("source", ["zip", "tar"])
def test_cache_hit_does_not_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    if source == "zip":
        path = _write_zip(tmp_path / "images.zip", _image_folder_members()[0])
    else:
        path = _write_release_tar(tmp_path / "cifar-10-python.tar.gz", _release_files()[0])
    cache = tmp_path / "cache"
    first = load_cifar10(path, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1  # one .pt, no temp files left
    monkeypatch.setattr(image_folder, "_decode_image", _refuse)
    monkeypatch.setattr(release, "_load_pickle", _refuse)
    _assert_same(first, load_cifar10(path, cache_dir=cache))


def test_cache_default_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "env-cache"))
    load_cifar10(_write_zip(tmp_path / "images.zip", _image_folder_members()[0]))
    assert [p.suffix for p in (tmp_path / "env-cache").iterdir()] == [".pt"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-content", "empty"])
def test_corrupt_cache_is_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    path = _write_zip(tmp_path / "images.zip", _image_folder_members()[0])
    cache = tmp_path / "cache"
    first = load_cifar10(path, cache_dir=cache)
    (cache_file,) = cache.iterdir()
    good = cache_file.read_bytes()
    if damage == "garbage":
        cache_file.write_bytes(b"not a torch file")
    elif damage == "truncated":
        cache_file.write_bytes(good[: len(good) // 2])
    elif damage == "wrong-content":
        torch.save({"train_images": torch.zeros(1)}, cache_file)
    else:
        cache_file.write_bytes(b"")
    calls = _count_calls(monkeypatch, "_decode_image")
    _assert_same(first, load_cifar10(path, cache_dir=cache))
    assert calls[0] == 9  # decoded again ...
    assert [p.name for p in cache.iterdir()] == [cache_file.name]
    monkeypatch.setattr(image_folder, "_decode_image", _refuse)
    _assert_same(first, load_cifar10(path, cache_dir=cache))  # ... and the cache is good again


def test_cache_key_follows_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_zip(tmp_path / "images.zip", _image_folder_members()[0])
    cache = tmp_path / "cache"
    load_cifar10(path, cache_dir=cache)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    calls = _count_calls(monkeypatch, "_decode_image")
    load_cifar10(path, cache_dir=cache)
    assert calls[0] == 9 and len(list(cache.iterdir())) == 2


def test_an_unwritable_cache_is_only_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write_zip(tmp_path / "images.zip", _image_folder_members()[0])
    (tmp_path / "cache").write_text("a file, not a directory")
    with caplog.at_level(logging.WARNING, logger="metagrad.data"):
        dataset = load_cifar10(path, cache_dir=tmp_path / "cache")
    assert dataset.train_images.shape == (6, 3, 32, 32)
    assert f"dataset cache not saved: could not write {tmp_path / 'cache'}/" in caplog.text
    assert caplog.text.rstrip().endswith(": not a directory")


# --------------------------------------------------------------------------- errors


def _assert_dataset_error(
    path: Path, load: Callable[[], object] | None = None, match: str = ""
) -> str:
    with pytest.raises(DatasetError) as info:
        (load or (lambda: load_cifar10(path, cache_dir=path.parent / "cache")))()
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    assert match.lower() in message.lower(), message
    return message


def test_error_missing_path(tmp_path: Path) -> None:
    _assert_dataset_error(tmp_path / "nope.zip", match="no such file")


def test_error_unknown_layouts(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _assert_dataset_error(tmp_path / "empty", match="expected")
    (tmp_path / "notes.txt").write_text("hello")
    _assert_dataset_error(tmp_path / "notes.txt", match="expected")


def test_error_garbage_zip(tmp_path: Path) -> None:
    path = tmp_path / "garbage.zip"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_dataset_error(path, match="zip")


def test_error_truncated_tar(tmp_path: Path) -> None:
    path = _write_release_tar(tmp_path / "cifar-10-python.tar.gz", _release_files()[0])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _assert_dataset_error(path, match="tar")


def test_error_missing_batch(tmp_path: Path) -> None:
    files, _ = _release_files()
    del files["test_batch"]
    _assert_dataset_error(_write_release_dir(tmp_path, files), match="test_batch")
    _assert_dataset_error(
        _write_release_tar(tmp_path / "c.tar.gz", files), match="missing test_batch"
    )


def test_error_bad_batch_content(tmp_path: Path) -> None:
    files, _ = _release_files()
    files["data_batch_3"] = _dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    folder = _write_release_dir(tmp_path, files)
    _assert_dataset_error(folder / "data_batch_3", lambda: load_cifar10(folder), match="3072")
    files["data_batch_3"] = b"\x80\x02garbage"
    (folder / "data_batch_3").write_bytes(files["data_batch_3"])
    _assert_dataset_error(folder / "data_batch_3", lambda: load_cifar10(folder), match="unpickle")


@pytest.mark.parametrize("container", ["dir", "zip"])
def test_error_wrong_image_size(tmp_path: Path, container: str) -> None:
    members = _image_folder_members()[0]
    members["train/cat/0000.png"] = _png(np.zeros((16, 16, 3), np.uint8))
    path = (
        _write_dir(tmp_path / "images", members)
        if container == "dir"
        else _write_zip(tmp_path / "images.zip", members)
    )
    message = _assert_dataset_error(path, match="expected a 32x32 image, got 16x16")
    assert "train/cat/0000.png" in message


def test_error_corrupt_image(tmp_path: Path) -> None:
    members = _image_folder_members()[0]
    members["test/dog/0000.png"] = b"\x89PNG not really"
    _assert_dataset_error(_write_zip(tmp_path / "images.zip", members), match="test/dog/0000.png")


def test_error_class_mismatch(tmp_path: Path) -> None:
    members = _image_folder_members()[0]
    members["test/eel/0000.png"] = members.pop("test/dog/0000.png")
    message = _assert_dataset_error(_write_zip(tmp_path / "images.zip", members), match="classes")
    assert "dog" in message and "eel" in message


def test_error_zip_without_splits(tmp_path: Path) -> None:
    members = {f"a/{k}": v for k, v in _image_folder_members()[0].items()}
    members |= {f"b/{k}": v for k, v in _image_folder_members()[0].items()}
    _assert_dataset_error(_write_zip(tmp_path / "two-tops.zip", members), match="top-level")


# --------------------------------------------------------------------------- safety


class _Payload:
    """Unpickling this runs ``touch <target>`` through os.system."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.target))}",)


def test_unpickler_refuses_code_execution(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    files, _ = _release_files()
    files["data_batch_2"] = pickle.dumps({b"data": _Payload(marker), b"labels": []}, protocol=2)
    folder = _write_release_dir(tmp_path, files)
    message = _assert_dataset_error(
        folder / "data_batch_2", lambda: load_cifar10(folder), match="refusing global"
    )
    assert "system" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "name", ["../evil", "cifar-10-batches-py/../../evil", "<absolute>", "C:/evil"]
)
def test_unsafe_tar_member_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    name = str(tmp_path / "evil") if name == "<absolute>" else name
    files, _ = _release_files()
    members = {f"cifar-10-batches-py/{n}": raw for n, raw in files.items()} | {name: b"pwned"}
    archive = _write_tar(tmp_path / "cifar-10-python.tar.gz", members)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _assert_dataset_error(archive, match="unsafe archive member")
    assert not (tmp_path / "evil").exists() and not (work / "evil").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz", "work"]
    assert not list(work.iterdir())


def test_unsafe_zip_member_is_refused(tmp_path: Path) -> None:
    members = _image_folder_members()[0] | {"../evil.png": b"pwned"}
    _assert_dataset_error(_write_zip(tmp_path / "images.zip", members), match="unsafe")
    assert not (tmp_path.parent / "evil.png").exists()


# --------------------------------------------------------------------------- download


def _served_release(tmp_path: Path) -> tuple[str, str, bytes]:
    archive = _write_release_tar(tmp_path / "server" / "release.tar.gz", _release_files()[0])
    raw = archive.read_bytes()
    return archive.as_uri(), hashlib.md5(raw, usedforsecurity=False).hexdigest(), raw


def test_download_and_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, md5, raw = _served_release(tmp_path)
    root = tmp_path / "root"
    path = download_cifar10(root, url=url, md5=md5)
    assert path == root / "cifar-10-python.tar.gz" and path.read_bytes() == raw
    assert [p.name for p in root.iterdir()] == [path.name]
    assert load_cifar10(root).train_images.shape == (15, 3, 32, 32)

    def offline(*args: object, **kwargs: object) -> None:
        raise AssertionError("downloaded although the file was present")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert download_cifar10(root, url=url, md5=md5) == path


def test_download_replaces_a_bad_file(tmp_path: Path) -> None:
    url, md5, raw = _served_release(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"half a download")
    assert download_cifar10(root, url=url, md5=md5).read_bytes() == raw


def test_download_wrong_md5(tmp_path: Path) -> None:
    url, _, _ = _served_release(tmp_path)
    root = tmp_path / "root"
    with pytest.raises(DatasetError, match=r"expected md5 0{32}") as info:
        download_cifar10(root, url=url, md5="0" * 32)
    assert url in str(info.value)
    assert list(root.iterdir()) == []  # neither the file nor a temporary one is left


def test_download_unreachable(tmp_path: Path) -> None:
    url = (tmp_path / "missing.tar.gz").as_uri()
    with pytest.raises(DatasetError, match="expected to download"):
        download_cifar10(tmp_path / "root", url=url, md5="0" * 32)
    assert list((tmp_path / "root").iterdir()) == []


# --------------------------------------------------------------------------- augmentation


def _reference_crop(
    image: torch.Tensor, out: torch.Tensor, padding: int
) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) whose crop of the zero-padded image equals ``out``."""
    padded = F.pad(image, (padding,) * 4)
    _, height, width = image.shape
    found = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + height, dx : dx + width]
            for flipped in (False, True):
                if torch.equal(crop.flip(-1) if flipped else crop, out):
                    found.append((dy, dx, flipped))
    return found


def test_augment_batch_matches_reference() -> None:
    images = torch.randint(
        0, 256, (32, 3, 16, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out = augment_batch(images, torch.Generator().manual_seed(1), padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8
    choices = []
    for image, result in zip(images, out, strict=True):
        found = _reference_crop(image, result, padding=4)
        assert len(found) == 1
        choices.append(found[0])
    assert len({(dy, dx) for dy, dx, _ in choices}) >= 10  # crops really vary
    assert {flipped for *_, flipped in choices} == {False, True}
    assert torch.equal(out, augment_batch(images, torch.Generator().manual_seed(1), padding=4))


def test_augment_batch_flips_about_half() -> None:
    images = torch.tensor([[[[1, 2]]]], dtype=torch.uint8).expand(4000, 1, 1, 2)
    out = augment_batch(images, torch.Generator().manual_seed(0), padding=0)
    flipped = out[:, 0, 0, 0] == 2
    assert torch.equal(out[flipped], images[flipped].flip(-1))
    assert torch.equal(out[~flipped], images[~flipped])
    assert 0.45 < flipped.float().mean().item() < 0.55


def test_augment_batch_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        augment_batch(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.Generator())
    with pytest.raises(ValueError):
        augment_batch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.Generator(), padding=-1)


# --------------------------------------------------------------------------- normalize


def test_normalize_values_and_format() -> None:
    images = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = normalize(images, mean, std)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = (
        images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1).double()
    ) / torch.tensor(std).view(1, 3, 1, 1).double()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)

    floats = images.float() / 255
    before = floats.clone()
    torch.testing.assert_close(normalize(floats, mean, std), out)
    assert torch.equal(floats, before)  # the input is not modified in place
    with pytest.raises(ValueError):
        normalize(images, mean[:2], std[:2])


# --------------------------------------------------------------------------- BatchLoader


def _loader(**overrides: object) -> BatchLoader:
    images = torch.randint(
        0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    kwargs: dict = dict(
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), shuffle=True, augment=True, seed=7
    )
    kwargs.update(overrides)
    return BatchLoader(images, torch.arange(50), 16, **kwargs)


def _batches(
    loader: BatchLoader, epoch: int, start: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch, start))


def _same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


def test_batch_loader_lengths_and_types() -> None:
    assert len(_loader()) == 4 and len(_loader(drop_last=True)) == 3
    batches = _batches(_loader(), 0)
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(50))
    assert [len(y) for _, y in _batches(_loader(drop_last=True), 0)] == [16, 16, 16]


def test_batch_loader_unshuffled_is_dataset_order() -> None:
    loader = _loader(shuffle=False, augment=False)
    batches = _batches(loader, 3)
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(50))
    expected = normalize(loader.images, loader.mean, loader.std)
    assert torch.equal(torch.cat([x for x, _ in batches]), expected)


def test_batch_loader_is_deterministic() -> None:
    assert _same_batches(_batches(_loader(), 2), _batches(_loader(), 2))
    assert not _same_batches(_batches(_loader(), 2), _batches(_loader(), 3))
    assert not _same_batches(_batches(_loader(), 2), _batches(_loader(seed=8), 2))
    plain, augmented = _batches(_loader(augment=False), 2), _batches(_loader(), 2)
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(plain, augmented, strict=True))
    assert not all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(plain, augmented, strict=True))


@pytest.mark.parametrize("start", [0, 1, 3, 4])
def test_batch_loader_resumes_exactly(start: int) -> None:
    full = _batches(_loader(), 5)
    assert _same_batches(
        _batches(_loader(), 5, start), full[start:]
    )  # fresh loader, as after a crash


def test_batch_loader_rejects_bad_arguments() -> None:
    images, labels = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)
    for batch_size in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="batch_size"):
            BatchLoader(images, labels, batch_size, mean=(0.5,), std=(0.5,))  # type: ignore[arg-type]
    loader = BatchLoader(images, labels, 2, mean=(0.5,), std=(0.5,))
    for start in (-1, 3):
        with pytest.raises(ValueError, match="start"):
            loader.epoch(0, start)
    with pytest.raises(ValueError):
        BatchLoader(images, labels[:3], 2, mean=(0.5,), std=(0.5,))


# --------------------------------------------------------------------------- digits


def test_digits_dataset() -> None:
    dataset = load_digits_dataset()
    assert dataset.train_images.shape[1:] == (1, 8, 8) and dataset.train_images.dtype == torch.uint8
    n_train, n_test = len(dataset.train_labels), len(dataset.test_labels)
    assert n_train + n_test == 1797 and abs(n_test - 0.25 * 1797) <= 1
    assert dataset.classes == [str(i) for i in range(10)]
    assert int(dataset.train_images.max()) == 255 and int(dataset.train_images.min()) == 0
    test_counts = torch.bincount(dataset.test_labels, minlength=10)
    assert (test_counts >= 40).all()  # stratified: every class about a quarter of its ~180
    scaled = dataset.train_images.double() / 255
    assert dataset.mean == pytest.approx((scaled.mean().item(),))
    assert dataset.std == pytest.approx((scaled.std(unbiased=False).item(),))

    again, other = load_digits_dataset(), load_digits_dataset(seed=1)
    assert torch.equal(again.test_images, dataset.test_images)
    assert not torch.equal(other.test_images, dataset.test_images)
    with pytest.raises(ValueError):
        load_digits_dataset(test_fraction=1.0)


# --------------------------------------------------------------------------- the real file


def test_real_cifar10_jpeg_zip(tmp_path: Path) -> None:
    if not SHARED_ZIP.is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{SHARED_ZIP} is missing, and CI=true requires it")
        pytest.skip(f"{SHARED_ZIP} not present (shared data beside the repository)")
    dataset = load_cifar10(SHARED_ZIP, cache_dir=tmp_path)
    assert dataset.train_images.shape == (50000, 3, 32, 32)
    assert dataset.test_images.shape == (10000, 3, 32, 32)
    assert dataset.classes == list(CIFAR10_CLASSES)
    assert torch.bincount(dataset.train_labels).tolist() == [5000] * 10
    assert torch.bincount(dataset.test_labels).tolist() == [1000] * 10
    sums = [int(dataset.train_images[:, c].sum(dtype=torch.int64)) for c in range(3)]
    means = [s / (50000 * 32 * 32 * 255) for s in sums]
    assert means == pytest.approx([0.4917, 0.4826, 0.4472], abs=3e-3)
    cached = load_cifar10(SHARED_ZIP, cache_dir=tmp_path)
    assert torch.equal(cached.train_images, dataset.train_images)


def test_a_loader_on_a_device_yields_the_same_batches():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (70,), generator=gen)
    kwargs = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), shuffle=True, augment=True, seed=3)
    here = BatchLoader(images, labels, 16, **kwargs)
    there = BatchLoader(images, labels, 16, device="cpu", **kwargs)  # the CUDA path, on the CPU
    for (xa, ya), (xb, yb) in zip(here.epoch(2, start=1), there.epoch(2, start=1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --------------------------------------------------------------------------- bounded reads


@pytest.mark.parametrize("container", ["zip", "image-dir", "tar", "release-dir"])
def test_oversized_member_or_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, container: str
) -> None:
    if container in ("zip", "image-dir"):
        monkeypatch.setattr(
            image_folder, "MAX_IMAGE_BYTES", 4000
        )  # the test PNGs take about 3.1 KiB
        members = _image_folder_members()[0] | {"train/cat/big.png": bytes(5000)}
        write = _write_zip if container == "zip" else _write_dir
        path = write(tmp_path / f"images.{container}", members)
        name, kind = "train/cat/big.png", "4.88 KiB is larger than the 3.91 KiB limit for one image"
    elif container == "tar":
        monkeypatch.setattr(release, "MAX_BATCH_BYTES", 5000)  # the test batches take 9 KiB
        path = _write_release_tar(tmp_path / "cifar-10-python.tar.gz", _release_files()[0])
        name, kind = "(member cifar-10-batches-py/data_batch_1)", "limit for one CIFAR-10 batch"
    else:
        monkeypatch.setattr(release, "MAX_META_BYTES", 10)
        path = _write_release_dir(tmp_path, _release_files()[0])
        name, kind = "batches.meta", "is larger than the 10 bytes limit for one batches.meta"
    message = _assert_dataset_error(path, match=kind)
    assert name in message and "refusing to read it" in message


def _spy_on_extraction(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the tar members the reader opens, as it opens them."""
    opened: list[str] = []
    extractfile = tarfile.TarFile.extractfile

    def spy(self: tarfile.TarFile, member: tarfile.TarInfo | str) -> object:
        opened.append(getattr(member, "name", member))
        return extractfile(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    return opened


def test_a_batch_member_over_the_limit_is_refused_before_it_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(release, "MAX_BATCH_BYTES", 5000)  # the test batches take 9 KiB
    opened = _spy_on_extraction(monkeypatch)
    path = _write_release_tar(tmp_path / "cifar-10-python.tar.gz", _release_files()[0])
    message = _assert_dataset_error(path, match="limit for one CIFAR-10 batch file")
    assert "(member cifar-10-batches-py/data_batch_1)" in message
    assert opened == []


def test_an_unrelated_member_over_the_limit_is_refused_before_it_is_decompressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Passing a member of a gzip stream decompresses it: a huge one is refused by the size its
    header declares, and nothing after it is read."""
    monkeypatch.setattr(release, "MAX_BATCH_BYTES", 16 << 10)
    opened = _spy_on_extraction(monkeypatch)
    files = _release_files()[0]
    members = {f"cifar-10-batches-py/{n}": files.pop(n) for n in ("batches.meta", "data_batch_1")}
    members["cifar-10-batches-py/zeros.bin"] = bytes(64 << 10)
    members |= {f"cifar-10-batches-py/{n}": raw for n, raw in files.items()}
    path = _write_tar(tmp_path / "cifar-10-python.tar.gz", members)
    message = _assert_dataset_error(
        path, match="64 KiB is larger than the 16 KiB limit for one member of the release"
    )
    assert "(member cifar-10-batches-py/zeros.bin)" in message
    assert opened == ["cifar-10-batches-py/batches.meta", "cifar-10-batches-py/data_batch_1"]


@pytest.mark.parametrize("name", ["cifar-10-python.tar.gz", "release.bin"])
def test_an_oversized_extended_tar_header_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """tarfile reads a pax header whole: one over the limit is refused by its declared size,
    also where a file of another name is probed for being a tar."""
    monkeypatch.setattr(release, "MAX_HEADER_BYTES", 1024)
    path = tmp_path / name
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.pax_headers = {"comment": "x" * 4000}
        tar.addfile(info, io.BytesIO(b""))
    _assert_dataset_error(path, match="an extended tar header of 3.92 KiB, larger than the 1 KiB")
    assert release.is_tar(path)


@pytest.mark.parametrize(
    ("limit", "value", "problem"),
    [
        ("MAX_ARCHIVE_MEMBERS", 3, "holds more than 3 members"),
        ("MAX_ARCHIVE_BYTES", 20 << 10, "the members so far declare"),
    ],
)
def test_an_archive_of_too_many_members_or_bytes_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str, value: int, problem: str
) -> None:
    monkeypatch.setattr(release, limit, value)
    path = _write_release_tar(tmp_path / "cifar-10-python.tar.gz", _release_files()[0])
    _assert_dataset_error(path, match=problem)


@pytest.mark.parametrize("mode", ["w", "w:bz2", "w:xz"])
def test_a_release_tar_of_any_compression_reads(tmp_path: Path, mode: str) -> None:
    files, expected = _release_files()
    path = tmp_path / "release.tar"
    with tarfile.open(path, mode) as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    _assert_matches(load_cifar10(path, cache_dir=tmp_path / "cache"), expected)
    renamed = path.rename(tmp_path / "release.data")  # found by content, not by name
    _assert_matches(load_cifar10(renamed, cache_dir=tmp_path / "cache"), expected)


def test_a_zip_member_over_the_limit_is_refused_before_it_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_folder, "MAX_IMAGE_BYTES", 4000)
    path = _write_zip(
        tmp_path / "images.zip", _image_folder_members()[0] | {"train/cat/big.png": bytes(5000)}
    )
    opened: list[str] = []
    zip_open = zipfile.ZipFile.open

    def spy(self: zipfile.ZipFile, name: zipfile.ZipInfo | str, *args: object) -> object:
        opened.append(getattr(name, "filename", name))
        return zip_open(self, name, *args)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    _assert_dataset_error(path, match="train/cat/big.png")
    assert "train/cat/big.png" not in opened


def _understate_zip_member(path: Path, name: str, size: int) -> None:
    """Patch the zip's local and central headers so that ``name`` claims ``size`` bytes."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    struct.pack_into("<I", raw, local + 22, size)  # local file header: uncompressed size
    central = raw.find(b"PK\x01\x02")
    while raw[central + 46 : central + 46 + len(name)] != name.encode():
        central = raw.find(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", raw, central + 24, size)  # central directory: uncompressed size
    path.write_bytes(bytes(raw))


def test_a_zip_member_that_understates_its_size_is_read_bounded(tmp_path: Path) -> None:
    """A member holding 32 MiB of zeros that claims 1000 bytes must not be inflated whole."""
    path = tmp_path / "forged.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, raw in _image_folder_members()[0].items():
            zf.writestr(name, raw)
        zf.writestr("train/ant/big.png", bytes(32 << 20))
    _understate_zip_member(path, "train/ant/big.png", 1000)
    tracemalloc.start()
    try:
        message = _assert_dataset_error(path, match="train/ant/big.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak} bytes traced while reading {message}"


def test_bounded_read_stops_at_the_limit() -> None:
    stream = io.BytesIO(bytes(100))
    with pytest.raises(DatasetError, match=r"holds more than the 50 bytes limit .* given as 10"):
        read_bounded(stream, 10, 50, "where", "image file")
    assert stream.tell() == 51
    assert read_bounded(io.BytesIO(bytes(50)), 10, 50, "where", "image file") == bytes(50)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels but whose data is a stub."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    stub = zlib.compress(bytes(16))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stub) + chunk(b"IEND", b"")
    )


def test_image_size_is_checked_before_decoding(tmp_path: Path) -> None:
    members = _image_folder_members()[0]
    members["train/cat/0000.png"] = _png_header_only(8000, 8000)  # 192 MB of pixels if decoded
    path = _write_zip(tmp_path / "images.zip", members)
    _assert_dataset_error(path, match="expected a 32x32 image, got 8000x8000")


# --------------------------------------------------------------------------- trainable content


def test_a_single_class_image_folder_is_refused(tmp_path: Path) -> None:
    members = {k: v for k, v in _image_folder_members()[0].items() if "/cat/" in k}
    for container in ("dir", "zip"):
        path = (
            _write_dir(tmp_path / "images", members)
            if container == "dir"
            else _write_zip(tmp_path / "images.zip", members)
        )
        _assert_dataset_error(path, match="has only 1 class (cat); classification needs at least 2")


def test_a_single_class_release_is_refused(tmp_path: Path) -> None:
    files, _ = _release_files()
    files["batches.meta"] = _dumps({b"label_names": [b"plane"]})
    folder = _write_release_dir(tmp_path / "one-name", files)
    _assert_dataset_error(folder / "batches.meta", lambda: load_cifar10(folder), "only 1 class")
    files, _ = _release_files()
    for name in TRAIN_BATCHES:  # three classes named, but every training image is a car
        files[name] = _dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 1]})
    folder = _write_release_dir(tmp_path / "one-label", files)
    _assert_dataset_error(folder, match="the train split has only 1 class (car)")


def test_an_empty_release_split_is_refused(tmp_path: Path) -> None:
    files, _ = _release_files()
    files["test_batch"] = _dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []})
    folder = _write_release_dir(tmp_path, files)
    _assert_dataset_error(folder, match="the test split is empty")


# --------------------------------------------------------------------------- needs_download


def test_needs_download(tmp_path: Path) -> None:
    assert needs_download(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert needs_download(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("no dataset here")
    assert needs_download(tmp_path / "other")
    folder = _write_release_dir(tmp_path / "release", _release_files()[0])
    assert not needs_download(folder) and not needs_download(folder.parent)
    assert not needs_download(_write_zip(tmp_path / "images.zip", _image_folder_members()[0]))


def test_download_into_an_existing_empty_directory(tmp_path: Path) -> None:
    url, md5, raw = _served_release(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    assert needs_download(root)
    path = download_cifar10(root, url=url, md5=md5)
    assert path.read_bytes() == raw and not needs_download(root)
    assert load_cifar10(root).train_images.shape == (15, 3, 32, 32)


def test_download_to_an_unwritable_place_is_a_dataset_error(tmp_path: Path) -> None:
    url, md5, _ = _served_release(tmp_path)
    (tmp_path / "file").write_text("a file where the directory should be")
    with pytest.raises(DatasetError, match="could not write") as info:
        download_cifar10(tmp_path / "file", url=url, md5=md5)
    assert str(tmp_path / "file") in str(info.value) and "\n" not in str(info.value)

"""The flat layout's module paths still import, for one release, with a DeprecationWarning."""

import importlib
import sys

import pytest

from metagrad._moved import MOVED, new_path


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_new_module_with_a_warning(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])


def test_submodules_of_an_old_package_path_follow_it(monkeypatch):
    for name in ("metagrad.int8", "metagrad.int8.codes"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module("metagrad.int8.codes")
    assert old is importlib.import_module("metagrad.backward.int8.codes")
    assert new_path("metagrad.int8.codes") == "metagrad.backward.int8.codes"
    assert new_path("metagrad.quant") is None  # same path, now a package

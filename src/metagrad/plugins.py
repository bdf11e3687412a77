"""Users' modules imported by name, so that what they register is usable by name.

A plugin is any importable module (on ``sys.path``: installed, on ``PYTHONPATH``, or in the
current directory under ``python -m metagrad``) whose import registers number formats, scale
formats, transforms, gradient presets, backends, models, hypernetwork kinds or forms, base
rules or conversion handlers. ``metagrad train --plugin MODULE`` (``plugins: [...]`` in a config
file) imports it before the settings are checked; the run saves the names, and ``--resume``
imports them again. Importing a module twice runs it once.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable


class PluginError(ImportError):
    """A plugin module could not be imported (one line: the module and why)."""


def load_plugins(names: Iterable[str]) -> None:
    """Import each module of ``names``, in order.

    Raises:
        PluginError: a name that is not a module name, or a module whose import failed (any
            exception it raised, named with its first line).
    """
    for name in names:
        if not isinstance(name, str) or not name:
            raise PluginError(f"a plugin is a module name such as 'my_formats', got {name!r}")
        try:
            importlib.import_module(name)
        except Exception as err:  # whatever the module raised: the run cannot use it
            lines = str(err).strip().splitlines()
            reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
            raise PluginError(f"plugin {name!r} could not be imported ({reason})") from err

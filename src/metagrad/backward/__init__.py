"""Backward products of quantized layers, behind one :class:`Backend` interface chosen by name.

Importing this package registers the built-in backends, ``simulate``, ``int8`` and ``fp8``.
"""

from metagrad.backward import int8, simulate  # simulate registers "simulate"
from metagrad.backward.backend import (
    Backend,
    fallback_report,
    get_backend,
    list_backends,
    register_backend,
)
from metagrad.backward.int8 import backend as int8_backend  # registers "int8"

from metagrad.backward import fp8  # registers "fp8", after the others  # isort: skip

__all__ = [
    "Backend",
    "fallback_report",
    "fp8",
    "get_backend",
    "int8",
    "int8_backend",
    "list_backends",
    "register_backend",
    "simulate",
]

"""Named entries of one kind, for extension by registration (formats, transforms, scale rules,
presets, backends, models, hypernetworks, base rules, conversion handlers)."""

from __future__ import annotations

import re
from collections.abc import Collection, Hashable
from typing import TypeVar

T = TypeVar("T")


def _label(key: Hashable) -> str:
    """A key as errors name it: a class by its name, anything else as ``str`` gives it."""
    return key.__name__ if isinstance(key, type) else str(key)


class Registry(dict[Hashable, T]):
    """A key -> entry mapping that refuses a key twice and names the choices on a miss.

    Keys are names, except where entries belong to something else that is hashable (the
    conversion handlers are keyed by module type). ``kind`` is what an entry is called in errors
    (``"number format"``, ``"backend"``, ...). ``pattern``: a regular expression that names must
    match in full (for names written inside other text, such as spec strings), described in
    errors by ``pattern_help``; ``reserved``: names that mean something else.
    """

    def __init__(
        self,
        kind: str,
        *,
        pattern: str | None = None,
        pattern_help: str = "",
        reserved: Collection[str] = (),
    ) -> None:
        super().__init__()
        self.kind = kind
        self.pattern = pattern
        self.pattern_help = pattern_help
        self.reserved = frozenset(reserved)

    def add(self, name: Hashable, entry: T) -> T:
        """Register ``entry`` as ``name``; returns it."""
        if name in self:
            raise ValueError(f"{self.kind} {_label(name)!r} is already registered")
        if name in self.reserved:
            raise ValueError(f"{self.kind} name {name!r} is reserved")
        if self.pattern is not None and not (
            isinstance(name, str) and re.fullmatch(self.pattern, name)
        ):
            raise ValueError(f"{self.kind} name {name!r} is not valid: {self.pattern_help}")
        self[name] = entry
        return entry

    def lookup(self, name: Hashable) -> T:
        """The entry ``name``; an unknown name raises ``ValueError`` listing the registered ones."""
        try:
            return self[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name is no name either
            raise ValueError(f"unknown {self.kind} {name!r}; available: {self.choices()}") from None

    def choices(self) -> str:
        """The registered names, comma-separated (for help texts and errors)."""
        return ", ".join(_label(key) for key in self)

    def copy(self) -> Registry[T]:
        """A registry of the same kind with the same entries."""
        new: Registry[T] = Registry(
            self.kind,
            pattern=self.pattern,
            pattern_help=self.pattern_help,
            reserved=self.reserved,
        )
        new.update(self)
        return new

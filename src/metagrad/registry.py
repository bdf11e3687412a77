"""Named entries of one kind, for extension by registration (formats, transforms, methods,
backends)."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """A name -> entry mapping that refuses a name twice and names the choices on a miss.

    ``kind`` is what an entry is called in errors (``"number format"``, ``"backend"``, ...).
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``; returns it."""
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry ``name``; an unknown name raises ``ValueError`` listing the registered ones."""
        try:
            return self[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self)}"
            ) from None

    def copy(self) -> Registry[T]:
        """A registry of the same kind with the same entries."""
        new: Registry[T] = Registry(self.kind)
        new.update(self)
        return new

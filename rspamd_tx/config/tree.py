"""The parsed configuration tree shared by the UCL parser, the layering and the schemas.

A parsed UCL document is made of plain Python values so that it compares
directly with ``rspamadm configdump -j``:

* objects are :class:`UclObject` (a ``dict`` that also remembers where each
  key was written),
* arrays, including implicit arrays made by repeating a key, are ``list``,
* strings are ``str``, integers ``int``, floats and times (in seconds) ``float``,
  booleans ``bool`` and ``null`` is ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Location:
    """A place in a configuration file: 1-based line and column."""

    filename: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}:{self.column}"


class UclObject(dict[str, Any]):
    """A UCL object: a ``dict`` whose keys remember their :class:`Location`.

    ``locations[key]`` is where ``key`` was (last) written; keys added in code
    have no entry. Equality ignores locations, so a tree compares equal to the
    JSON that ``rspamadm configdump -j`` prints for the same input.
    """

    __slots__ = ("locations",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.locations: dict[str, Location] = {}

    def location(self, key: str) -> Location | None:
        """Where ``key`` was written, if it came from a file."""
        return self.locations.get(key)


class ConfigError(Exception):
    """A configuration problem tied to a place in a file.

    ``str(error)`` is ``file:line:col: message`` when the location is known,
    else just the message.
    """

    def __init__(self, message: str, location: Location | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.location = location

    def __str__(self) -> str:
        if self.location is None:
            return self.message
        return f"{self.location}: {self.message}"

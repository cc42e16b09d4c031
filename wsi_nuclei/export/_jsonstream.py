"""A strict, incremental JSON reader: walks a top-level object or array itself so that a file
with millions of features is read one value at a time (used by the validator)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any


class _StrictJSONError(ValueError):
    """A JSON text that Python's strict readers refuse (NaN/Infinity literals)."""


def _reject_constant(name: str) -> Any:
    """``parse_constant`` hook: NaN, Infinity and -Infinity are not JSON."""
    raise _StrictJSONError(f"non-standard JSON literal {name} (write strict JSON)")


class _JsonStream:
    """Incremental reader of one JSON text: walks the top-level object/array itself and decodes
    each member with :meth:`json.JSONDecoder.raw_decode`, so a FeatureCollection with millions
    of features is validated feature by feature, without building them all in memory."""

    _CHUNK: int = 1 << 20  # characters read at a time
    _WS: str = " \t\n\r"

    def __init__(self, text: io.TextIOBase) -> None:
        self._text = text
        self._buf = ""
        self._pos = 0
        self._eof = False
        self._decoder = json.JSONDecoder(parse_constant=_reject_constant)

    def _fill(self) -> bool:
        """Append a chunk to the buffer (dropping the consumed part); False at end of file."""
        if self._eof:
            return False
        chunk = self._text.read(self._CHUNK)
        if not chunk:
            self._eof = True
            return False
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def peek(self) -> str:
        """Next non-whitespace character ('' at end of input), not consumed."""
        while True:
            while self._pos < len(self._buf) and self._buf[self._pos] in self._WS:
                self._pos += 1
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._fill():
                return ""

    def expect(self, chars: str) -> str:
        """Consume the next non-whitespace character, which must be one of ``chars``."""
        c = self.peek()
        if not c or c not in chars:
            found = repr(c) if c else "end of file"
            raise json.JSONDecodeError(f"expected one of {chars!r}, found {found}", "", 0)
        self._pos += 1
        return c

    def value(self) -> Any:
        """Decode the next JSON value, reading more input until it is complete."""
        self.peek()
        while True:
            try:
                obj, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError:
                if self._fill():
                    continue
                raise
            if end == len(self._buf) and not self._eof:
                # a number may continue in the next chunk: decode again with more input
                if self._buf[end - 1] not in '}]"el' and self._fill():
                    continue
            self._pos = end
            return obj

    def members(self) -> Iterator[str]:
        """Consume the next object member by member: yields each key (its ``:`` consumed); the
        caller consumes the member's value before the next key is read."""
        self.expect("{")
        if self.peek() == "}":
            self.expect("}")
            return
        while True:
            key = self.value()
            if not isinstance(key, str):
                raise json.JSONDecodeError("object key is not a string", "", 0)
            self.expect(":")
            yield key
            if self.expect(",}") == "}":
                return

    def elements(self) -> Iterator[int]:
        """Consume the next array element by element: yields each index; the caller consumes
        the element before the next one is read."""
        self.expect("[")
        if self.peek() == "]":
            self.expect("]")
            return
        i = 0
        while True:
            yield i
            i += 1
            if self.expect(",]") == "]":
                return

    def at_end(self) -> bool:
        """True when only whitespace is left."""
        return self.peek() == ""

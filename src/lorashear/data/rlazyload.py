"""Read character vectors from an installed R package's lazy-load data base.

R packages built with ``LazyData: true`` keep their data sets in
``data/Rdata.rdx`` (a gzip-compressed serialized index) and ``data/Rdata.rdb``
(zlib-compressed serialized objects at the offsets the index names). This
module reads the subset of R's XDR serialization format that plain data needs
(vectors, lists, attributes), so that text shipped in an R package can be used
without R itself.

Worked example: the index of ``janeaustenr`` deserialises to
``{"variables": {"emma": [offset, length], ...}, "references": {}, "compressed": True}``;
``read_lazyload_objects(dir)["emma"]`` is then the novel as a list of lines.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

from ..errors import DataError

# SEXP type codes (R Internals, "Serialization Formats").
_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP = 0, 1, 2, 9
_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 10, 13, 14, 16, 19
_REFSXP, _NILVALUE_SXP = 255, 254
_NA_INT = -(2**31)


class _Reader:
    """Sequential reader over one XDR-serialized R object."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def header(self) -> None:
        if self._bytes(2) != b"X\n":
            raise DataError("R data is not in XDR serialization format")
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader R version
        if version == 3:
            self._bytes(self._int())  # native encoding name
        elif version != 2:
            raise DataError(f"unsupported R serialization version {version}")

    def item(self) -> Any:
        flags = self._int()
        kind = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if kind in (_NILVALUE_SXP, _NILSXP):
            return None
        if kind == _REFSXP:
            return self.refs[(flags >> 8) - 1]
        if kind == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _CHARSXP:
            n = self._int()
            return None if n == -1 else self._bytes(n).decode("utf-8", errors="replace")
        if kind == _LISTSXP:  # pairlist: returned as a dict of tag -> value
            out: dict[str, Any] = {}
            while kind == _LISTSXP:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else str(len(out))
                out[str(tag)] = self.item()
                flags = self._int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
            return out
        if kind in (_LGLSXP, _INTSXP):
            n = self._int()
            values: Any = [None if v == _NA_INT else v for v in struct.unpack_from(f">{n}i", self.data, self.pos)]
            self.pos += 4 * n
        elif kind == _REALSXP:
            n = self._int()
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind == _STRSXP:
            values = [self.item() for _ in range(self._int())]
        elif kind == _VECSXP:
            values = [self.item() for _ in range(self._int())]
        else:
            raise DataError(f"unsupported R object type {kind} in serialized data")
        if has_attr:
            attrs = self.item() or {}
            names = attrs.get("names")
            if names is not None and kind == _VECSXP:
                return dict(zip(names, values))
        return values


def unserialize(data: bytes) -> Any:
    """Deserialize one XDR-serialized R object (no ``RDX`` file magic)."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def read_lazyload_objects(data_dir: str | Path, prefix: str = "Rdata") -> dict[str, Any]:
    """Return every object of an R lazy-load data base as Python values.

    Character vectors become ``list[str | None]``, named lists become dicts.
    """
    data_dir = Path(data_dir)
    index_path, db_path = data_dir / f"{prefix}.rdx", data_dir / f"{prefix}.rdb"
    if not index_path.is_file() or not db_path.is_file():
        raise DataError(f"{data_dir} holds no R lazy-load data base ({prefix}.rdx/.rdb)")
    index = unserialize(gzip.decompress(index_path.read_bytes()))
    blob = db_path.read_bytes()
    objects: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[offset : offset + length]
        # Each record: 4-byte big-endian uncompressed length, then zlib data.
        objects[name] = unserialize(zlib.decompress(chunk[4:]))
    return objects

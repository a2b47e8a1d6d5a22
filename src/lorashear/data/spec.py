"""The ``--data SPEC`` grammar: one string names any text source.

Grammar::

    SPEC    := SOURCE (":" OPTION)*
    SOURCE  := "builtin:" NAME            built-in offline corpus (see BUILTIN_SOURCES)
             | "hf:" DATASET              a ``datasets`` hub data set (needs the network)
             | PATH                       a local file or folder
    OPTION  := KEY "=" VALUE              KEY in: split, field, config

Examples::

    notes.txt                                        every paragraph of a text file
    corpus.jsonl:field=content                       one text per JSON line, from "content"
    shards/                                          every txt/jsonl/json/parquet file below
    data.parquet:field=text:split=validation         a deterministic 10 % document split
    hf:Salesforce/wikitext:config=wikitext-2-raw-v1:split=train:field=text
    hf:Salesforce/wikitext/wikitext-2-raw-v1         shorthand: a third path part is the config
    builtin:calibration                              offline training/calibration English text
    builtin:heldout                                  offline held-out prose for perplexity
    builtin:wikipedia:split=validation               one built-in source, one split

Options are only recognised at the end of the spec and only with a known key,
so paths that contain ``:`` still work (``C:/data/x.txt``, ``a:b.txt``).
Defaults: ``field`` is ``text`` (records without it but with prompt/response
or messages keys are rendered as instructions); ``split`` is ``train`` for hub
data sets and "everything" for local files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from ..errors import DataError

Kind = Literal["builtin", "hf", "local"]
OPTION_KEYS = ("split", "field", "config")
#: ``heldout`` = ``validation`` + ``test`` (see :mod:`.splits`)
SPLITS = ("train", "validation", "test", "heldout")
_OPTION = re.compile(r"^(split|field|config)=(.*)$")


@dataclass(frozen=True)
class DataSpec:
    """A parsed data source name.

    Attributes:
        kind: ``"builtin"``, ``"hf"`` or ``"local"``.
        source: the built-in name, the hub data set path, or the local path.
        split: requested split (``None``: the kind's default).
        field: record field holding the text (``None``: ``text`` or instruction keys).
        config: hub configuration name (``hf`` only).
    """

    kind: Kind
    source: str
    split: str | None = None
    field: str | None = None
    config: str | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise DataError("empty data source; see `lorashear --help` for the --data grammar")
        if self.config is not None and self.kind != "hf":
            raise DataError(f"option config= only applies to hf: specs, not {self.kind} {self.source!r}")

    def with_split(self, split: str | None) -> DataSpec:
        """Return a copy with ``split`` replaced when ``split`` is not ``None``."""
        return self if split is None else replace(self, split=split)

    def __str__(self) -> str:
        head = {"builtin": "builtin:", "hf": "hf:", "local": ""}[self.kind] + self.source
        options = [f"{key}={getattr(self, key)}" for key in OPTION_KEYS if getattr(self, key) is not None]
        return ":".join([head, *options])


def parse_data_spec(spec: str | DataSpec) -> DataSpec:
    """Parse a ``--data`` string (see the module docstring for the grammar).

    Raises:
        DataError: on an empty spec, an empty or repeated option, or an option
            that does not apply to the source kind.
    """
    if isinstance(spec, DataSpec):
        return spec
    text = str(spec).strip()
    if not text:
        raise DataError("empty data spec; pass a file, a folder, hf:NAME or builtin:NAME")
    parts = text.split(":")
    options: dict[str, str] = {}
    while len(parts) > 1 and (match := _OPTION.match(parts[-1])):
        key, value = match.groups()
        if key in options:
            raise DataError(f"option {key}= given twice in data spec {text!r}")
        if not value:
            raise DataError(f"option {key}= has no value in data spec {text!r}")
        options[key] = value
        parts.pop()
    head = ":".join(parts)
    kind: Kind
    if head.startswith("builtin:"):
        kind, source = "builtin", head[len("builtin:") :]
    elif head.startswith("hf:"):
        kind, source = "hf", head[len("hf:") :].strip("/")
        pieces = source.split("/")
        if len(pieces) == 3:
            if "config" in options:
                raise DataError(f"config given twice in {text!r}: as a path part and as config=")
            source, options["config"] = "/".join(pieces[:2]), pieces[2]
        elif len(pieces) > 3:
            raise DataError(f"hub data set {source!r} has too many '/' parts; use OWNER/NAME[/CONFIG]")
    else:
        kind, source = "local", head
    if not source:
        raise DataError(f"data spec {text!r} names no source after {head!r}")
    return DataSpec(kind=kind, source=source, split=options.get("split"), field=options.get("field"),
                    config=options.get("config"))

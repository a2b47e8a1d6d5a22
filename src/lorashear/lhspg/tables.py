"""Vectorised access to many groups' slices at once.

A :class:`SliceTable` flattens the slices of a list of groups into one entry per
``(parameter, dim)``: every index along that dim (``idx``) and the position of
the group that owns it (``gid``). Per-group quantities (squared norms, inner
products) are then one ``index_select`` of all the rows (or columns) of a weight,
a row-wise reduction, and one ``index_add_`` into a ``(num_groups,)`` vector: no
Python loop over groups at step time.

:class:`LoraInfo` ties a base weight (``X.base_layer.weight`` of a peft
``LoraLayer``) to its factors ``A`` (r x in), ``B`` (out x r) and scale
``s = lora_alpha / r``, read from the layer's ``scaling``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..graph.groups import Group

from ..models.params import LORA_MARKERS, is_lora_name  # noqa: F401  (re-exported)


@dataclass
class LoraInfo:
    """The LoRA factors attached to one base weight: ``W = x + scaling * B @ A``."""

    A: torch.nn.Parameter  # (r, in)
    B: torch.nn.Parameter  # (out, r)
    scaling: float
    module_name: str

    def delta(self) -> torch.Tensor:
        """``s * B @ A`` in fp32, shape (out, in)."""
        return self.scaling * (self.B.detach().float() @ self.A.detach().float())

    def delta_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """``(s B A)[idx, :]``, shape (n, in)."""
        return self.scaling * (self.B.detach().float().index_select(0, idx) @ self.A.detach().float())

    def delta_cols(self, idx: torch.Tensor) -> torch.Tensor:
        """``(s B A)[:, idx]``, shape (out, n)."""
        return self.scaling * (self.B.detach().float() @ self.A.detach().float().index_select(1, idx))


def find_loras(model: torch.nn.Module) -> dict[str, LoraInfo]:
    """Map ``<module>.base_layer.weight`` to its :class:`LoraInfo` for every peft LoRA Linear."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return {}
    out: dict[str, LoraInfo] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not adapters:
            continue
        if len(adapters) > 1:
            raise ValueError(f"{name}: LHSPG supports one active LoRA adapter, found {adapters}")
        a = adapters[0]
        base = module.get_base_layer()
        if not isinstance(base, torch.nn.Linear):
            continue
        prefix = f"{name}." if name else ""
        out[f"{prefix}base_layer.weight"] = LoraInfo(
            A=module.lora_A[a].weight, B=module.lora_B[a].weight, scaling=float(module.scaling[a]), module_name=name)
    return out


@dataclass
class SliceEntry:
    """All indices of one ``(parameter, dim)`` owned by the table's groups."""

    name: str
    dim: int
    idx: torch.Tensor  # (n,) positions along ``dim``
    gid: torch.Tensor  # (n,) owning group position in the table
    lora: bool  # a LoRA factor slice (lora_B rows / lora_A columns)


#: per cut ``(parameter, dim)``: the current position of every index of the uncut model (-1: cut out)
Positions = Mapping[tuple[str, int], torch.Tensor]


class SliceTable:
    """The slices of ``groups`` gathered per ``(parameter, dim)``; group ``i`` is ``groups[i]``.

    ``positions`` (:attr:`lorashear.compaction.Compactions.positions`) re-indexes the groups' slices to a model
    that structures were cut out of: an index cut out is left out of the table."""

    def __init__(self, groups: Sequence[Group], params: dict[str, torch.Tensor], *,
                 positions: Positions | None = None) -> None:
        self.groups = list(groups)
        idx_lists: dict[tuple[str, int], list[int]] = defaultdict(list)
        gid_lists: dict[tuple[str, int], list[int]] = defaultdict(list)
        for pos, g in enumerate(self.groups):
            for s in g.slices:
                key = (s.name, s.dim)
                idx_lists[key].extend(s.indices)
                gid_lists[key].extend([pos] * len(s.indices))
        self.entries: list[SliceEntry] = []
        for (name, dim), idx in idx_lists.items():
            device = params[name].device
            index = torch.tensor(idx, dtype=torch.long)
            gid = torch.tensor(gid_lists[(name, dim)], dtype=torch.long)
            moved = positions.get((name, dim)) if positions else None
            if moved is not None:
                index = moved[index]
                alive = index >= 0
                index, gid = index[alive], gid[alive]
                if not index.numel():
                    continue
            self.entries.append(SliceEntry(name=name, dim=dim, idx=index.to(device), gid=gid.to(device),
                                           lora=is_lora_name(name)))
        # rows (dim 0) first: folding rows zeroes lora_B rows before columns read B
        self.entries.sort(key=lambda e: (e.lora, e.dim, e.name))

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def base_entries(self) -> list[SliceEntry]:
        return [e for e in self.entries if not e.lora]

    @property
    def lora_entries(self) -> list[SliceEntry]:
        return [e for e in self.entries if e.lora]

    def union(self) -> dict[tuple[str, int], torch.Tensor]:
        """Unique indices per ``(parameter, dim)`` (for zeroing)."""
        return {(e.name, e.dim): torch.unique(e.idx) for e in self.entries}


def gather(p: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """Slices ``idx`` of ``p`` along ``dim`` as fp32 rows: shape (n, numel / size(dim))."""
    x = p.detach().index_select(dim, idx)
    return x.movedim(dim, 0).reshape(idx.numel(), -1).float()


def scatter(p: torch.Tensor, dim: int, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` (n, rest) back into slices ``idx`` of ``p`` along ``dim`` (in place)."""
    shape = list(p.shape)
    shape.pop(dim)
    shape.insert(0, idx.numel())
    values = rows.reshape(shape).movedim(0, dim).to(p.dtype)
    with torch.no_grad():
        p.index_copy_(dim, idx, values)


def lora_rows(lora: LoraInfo | None, dim: int, idx: torch.Tensor, ndim: int) -> torch.Tensor | None:
    """``(s B A)`` restricted to the same slices as :func:`gather` (None when there is no LoRA)."""
    if lora is None or ndim != 2:
        return None
    if dim == 0:
        return lora.delta_rows(idx)  # (n, in)
    return lora.delta_cols(idx).t()  # (n, out)

"""Channel spaces: the index sets that tensor dimensions range over, and how they relate.

Every dimension of every tensor seen while tracing ranges over a *space*. Two
dimensions that must be pruned together (the output rows of ``gate_proj`` and
``up_proj`` multiplied element-wise, the residual stream added across layers)
are unified into one space with a union-find. Spaces also carry structure:

- a **product** ``S = (A, B)``: a reshape split ``S`` into ``A`` outer and ``B``
  inner indices (``c = a * |B| + b``), e.g. ``q_proj`` rows = (heads, head_dim).
  Under grouped-query attention the head space itself becomes ``(kv_groups, slots)``
  when the trace sees ``repeat_kv`` expand the key heads.
- a **concatenation** ``S = [S1 | S2 | ...]``: slices or chunks of ``S``, e.g. a fused
  ``qkv_proj`` output or a fused ``gate_up_proj``.

The *atoms* of a space are the leaves of this structure; each index of an
atom is one candidate removable structure. :meth:`SpaceTable.coordinates`
maps every element of a space to its atom coordinates, which is how a group
finds its exact slices in each parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SpaceInfo:
    size: int
    factors: tuple[int, ...] | None = None  # product structure (row-major), space ids
    segments: tuple[int, ...] | None = None  # concat structure, space ids in order
    indivisible: bool = False  # never split (inside an attention head)
    blocked: list[str] = field(default_factory=list)  # why it cannot be pruned
    tags: set[str] = field(default_factory=set)


class SpaceTable:
    """Union-find over spaces with product/concat structure."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._info: list[SpaceInfo] = []
        self._product_memo: dict[tuple[int, ...], int] = {}

    # -- basics ---------------------------------------------------------------
    def new(self, size: int, *, tag: str | None = None) -> int:
        sid = len(self._parent)
        self._parent.append(sid)
        self._info.append(SpaceInfo(size=int(size), tags={tag} if tag else set()))
        return sid

    def find(self, sid: int) -> int:
        root = sid
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[sid] != root:  # path compression
            self._parent[sid], sid = root, self._parent[sid]
        return root

    def info(self, sid: int) -> SpaceInfo:
        return self._info[self.find(sid)]

    def size(self, sid: int) -> int:
        return self._info[self.find(sid)].size

    def tag(self, sid: int, tag: str) -> None:
        self.info(sid).tags.add(tag)

    def block(self, sid: int, reason: str) -> None:
        info = self.info(sid)
        if reason not in info.blocked:
            info.blocked.append(reason)

    def mark_indivisible(self, sid: int) -> None:
        self.info(sid).indivisible = True

    # -- union ------------------------------------------------------------------
    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ia, ib = self._info[ra], self._info[rb]
        if ia.size != ib.size:
            reason = f"size mismatch {ia.size} vs {ib.size}"
            self.block(ra, reason)
            self.block(rb, reason)
            return ra
        self._parent[rb] = ra
        ia.indivisible |= ib.indivisible
        ia.blocked.extend(r for r in ib.blocked if r not in ia.blocked)
        ia.tags |= ib.tags
        fa, fb = ia.factors, ib.factors
        sa, sb = ia.segments, ib.segments
        if fa is None and fb is not None:
            ia.factors = fb
        elif fa is not None and fb is not None:
            self._align_products(list(fa), list(fb), ra)
        if sa is None and sb is not None:
            ia.segments = sb
        elif sa is not None and sb is not None:
            self._align_segments(sa, sb, ra)
        return self.find(ra)

    def _align_products(self, fa: list[int], fb: list[int], owner: int) -> None:
        """Unify two factorisations of the same space (refining where they differ)."""
        i = j = 0
        while i < len(fa) and j < len(fb):
            pa, pb = self.size(fa[i]), self.size(fb[j])
            if pa == pb:
                self.union(fa[i], fb[j])
                i, j = i + 1, j + 1
                continue
            # one side spans several factors of the other: give it that factorisation
            run_a, run_b = [fa[i]], [fb[j]]
            while pa != pb:
                if pa < pb:
                    i += 1
                    if i >= len(fa):
                        self.block(owner, "incompatible reshapes")
                        return
                    run_a.append(fa[i])
                    pa *= self.size(fa[i])
                else:
                    j += 1
                    if j >= len(fb):
                        self.block(owner, "incompatible reshapes")
                        return
                    run_b.append(fb[j])
                    pb *= self.size(fb[j])
            if len(run_a) == 1:
                self.set_factors(run_a[0], run_b)
            elif len(run_b) == 1:
                self.set_factors(run_b[0], run_a)
            else:
                self.block(owner, "incompatible reshapes")
            i, j = i + 1, j + 1

    def _align_segments(self, sa: tuple[int, ...], sb: tuple[int, ...], owner: int) -> None:
        bounds_a = np.cumsum([self.size(s) for s in sa]).tolist()
        bounds_b = np.cumsum([self.size(s) for s in sb]).tolist()
        if bounds_a != bounds_b:
            self.block(owner, "incompatible slicing")
            return
        for x, y in zip(sa, sb):
            self.union(x, y)

    # -- structure ------------------------------------------------------------
    def set_factors(self, sid: int, factors: list[int] | tuple[int, ...]) -> None:
        """Record ``sid = product(factors)`` (row-major), unifying with an existing factorisation."""
        factors = tuple(f for f in factors if self.size(f) != 1)
        info = self.info(sid)
        if len(factors) <= 1:
            if len(factors) == 1:
                self.union(sid, factors[0])
            return
        if int(np.prod([self.size(f) for f in factors])) != info.size:
            self.block(sid, "reshape size mismatch")
            return
        if info.factors is None:
            info.factors = factors
        else:
            self._align_products(list(info.factors), list(factors), self.find(sid))

    def product_of(self, factors: list[int]) -> int:
        """A space equal to ``product(factors)`` (memoised so equal products share a space)."""
        factors = [f for f in factors if self.size(f) != 1]
        if len(factors) == 1:
            return factors[0]
        key = tuple(self.find(f) for f in factors)
        if key in self._product_memo:
            return self._product_memo[key]
        sid = self.new(int(np.prod([self.size(f) for f in factors])))
        self.set_factors(sid, factors)
        self._product_memo[key] = sid
        return sid

    def segment(self, sid: int, start: int, stop: int) -> int:
        """The sub-space ``sid[start:stop]`` (recording a concat structure on ``sid``)."""
        info = self.info(sid)
        if start <= 0 and stop >= info.size:
            return sid
        if info.indivisible:
            return self.new(stop - start, tag="fragment")
        if info.segments is None:
            parts = []
            if start > 0:
                parts.append(self.new(start))
            mid = self.new(stop - start)
            parts.append(mid)
            if stop < info.size:
                parts.append(self.new(info.size - stop))
            info.segments = tuple(parts)
            return mid
        # find an existing segment with these bounds, or split one that contains them
        offset = 0
        new_parts: list[int] = []
        found: int | None = None
        for part in info.segments:
            psize = self.size(part)
            lo, hi = offset, offset + psize
            if lo == start and hi == stop:
                found = part
                new_parts.append(part)
            elif lo <= start and stop <= hi and found is None:
                sub = self.segment(part, start - lo, stop - lo)
                found = sub
                new_parts.append(part)
            else:
                new_parts.append(part)
            offset = hi
        if found is None:
            self.block(sid, "slice across segments")
            return self.new(stop - start, tag="fragment")
        return found

    def concat_of(self, parts: list[int]) -> int:
        sid = self.new(sum(self.size(p) for p in parts))
        self.info(sid).segments = tuple(parts)
        return sid

    # -- reading results ----------------------------------------------------------
    def coordinates(self, sid: int) -> tuple[dict[int, np.ndarray], set[int]]:
        """Atom coordinates of every element of ``sid``.

        Returns ``(coords, blocked_atoms)`` where ``coords[atom][e]`` is the index of
        element ``e`` along ``atom`` (``-1`` where the element does not involve that
        atom, e.g. the other segment of a concatenation) and ``blocked_atoms`` are
        atoms reached through a blocked or indivisible space.
        """
        size = self.size(sid)
        coords: dict[int, np.ndarray] = {}
        blocked: set[int] = set()
        self._fill(self.find(sid), np.arange(size), np.arange(size), coords, blocked, False, size)
        return coords, blocked

    def _fill(self, sid: int, elems: np.ndarray, local: np.ndarray, coords: dict[int, np.ndarray],
              blocked: set[int], inherited_block: bool, total: int) -> None:
        sid = self.find(sid)
        info = self._info[sid]
        is_blocked = inherited_block or bool(info.blocked) or info.indivisible
        if info.indivisible or (info.factors is None and info.segments is None):
            arr = coords.setdefault(sid, np.full(total, -1, dtype=np.int64))
            arr[elems] = local
            if is_blocked:
                blocked.add(sid)
            return
        if info.factors is not None:
            sizes = [self.size(f) for f in info.factors]
            rest = local.copy()
            strides = np.cumprod([1, *sizes[::-1]])[::-1][1:]
            for f, stride in zip(info.factors, strides):
                self._fill(f, elems, rest // stride, coords, blocked, is_blocked, total)
                rest = rest % stride
            return
        offset = 0
        assert info.segments is not None
        for part in info.segments:
            psize = self.size(part)
            mask = (local >= offset) & (local < offset + psize)
            if mask.any():
                self._fill(part, elems[mask], local[mask] - offset, coords, blocked, is_blocked, total)
            offset += psize

    def atoms(self, sid: int) -> list[int]:
        return list(self.coordinates(sid)[0])

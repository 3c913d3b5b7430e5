"""The flat parameter space: named tensors laid end to end, and the layer tree over them.

The store and the engine work on one flat vector (an element axis) because every
attribution is a sum over elements; names, shapes and param groups map slices of it
back to what users select (``layer emb``, ``param emb.weight``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    group: int
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def stop(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class ParamSpace:
    params: tuple[ParamInfo, ...]

    @staticmethod
    def build(entries: list[tuple[str, tuple[int, ...], int]]) -> ParamSpace:
        out, off = [], 0
        for name, shape, group in entries:
            info = ParamInfo(name, tuple(int(d) for d in shape), int(group), off)
            out.append(info)
            off = info.stop
        return ParamSpace(tuple(out))

    def to_json(self) -> list[dict]:
        return [{"name": p.name, "shape": list(p.shape), "group": p.group} for p in self.params]

    @staticmethod
    def from_json(items: list[dict]) -> ParamSpace:
        return ParamSpace.build([(d["name"], tuple(d["shape"]), d["group"]) for d in items])

    @property
    def size(self) -> int:
        return self.params[-1].stop if self.params else 0

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @cached_property
    def by_name(self) -> dict[str, ParamInfo]:
        return {p.name: p for p in self.params}

    @cached_property
    def group_index(self) -> torch.Tensor:
        """Param-group index of every element."""
        return torch.cat([torch.full((p.numel,), p.group, dtype=torch.long) for p in self.params])

    def unflatten(self, flat: torch.Tensor, names: list[str] | None = None, split: bool = False) -> dict[str, torch.Tensor]:
        """Views of ``flat`` as named tensors (``names`` restricts to a subset, in this order).

        With ``split``, one split rather than a slice per param: under autograd a slice's backward writes a
        zero-filled copy of the whole vector and adds it up, once per param (tiny GPT-2's 29 tensors: two
        thirds of a batched gradient's time), where the split's backward is one concatenation. A split's
        views may not be changed in place, which a module may do to its weight (an Embedding's max_norm).
        """
        chosen = self.params if names is None else [self.by_name[n] for n in names]
        if split:
            sizes = [p.numel for p in chosen]
            parts = torch.split(flat if flat.shape[0] == sum(sizes) else flat[:sum(sizes)], sizes)
            return {p.name: part.view(p.shape) for p, part in zip(chosen, parts)}
        out, off = {}, 0
        for p in chosen:
            out[p.name] = flat[off: off + p.numel].view(p.shape)
            off += p.numel
        return out

    def subspace(self, names: list[str]) -> ParamSpace:
        """The selected params (in space order) as a space of their own."""
        keep = set(names)
        return ParamSpace.build([(p.name, p.shape, p.group) for p in self.params if p.name in keep])

    def element_index(self, sub: ParamSpace) -> torch.Tensor:
        """Indices of ``sub``'s elements in this space's flat vector."""
        return torch.cat([torch.arange(self.by_name[p.name].offset, self.by_name[p.name].stop)
                          for p in sub.params]) if sub.params else torch.zeros(0, dtype=torch.long)

    def layers(self) -> list[str]:
        """Every module path that prefixes some param (``a``, ``a.b``), in first-seen order."""
        seen: dict[str, None] = {}
        for p in self.params:
            parts = p.name.split(".")
            for i in range(1, len(parts)):
                seen.setdefault(".".join(parts[:i]), None)
        return list(seen)

    def params_of_layer(self, layer: str) -> list[str]:
        return [p.name for p in self.params if p.name.startswith(layer + ".")]

    def match(self, kind: str, pattern: str) -> list[str]:
        """Param names selected by ``layer PATTERN`` or ``param PATTERN`` (globs allowed)."""
        if kind == "param":
            return [p.name for p in self.params if fnmatch.fnmatchcase(p.name, pattern)]
        layers = [lay for lay in self.layers() if fnmatch.fnmatchcase(lay, pattern)]
        return [p.name for p in self.params if any(p.name.startswith(lay + ".") for lay in layers)]

    def top_layer(self, name: str) -> str:
        """The layer a param is reported under by ``by layer``: its module path."""
        return name.rsplit(".", 1)[0] if "." in name else name

"""Typed, immutable syntax tree of a query, and its canonical text form.

Later passes (semantic check, planner) consume these nodes instead of lark trees so
they never depend on the grammar's shape. Every node keeps `pos`, the character offset
in the parsed text where it starts, so those passes can raise
`SemanticError(message, query.text, node.pos)`. `pos` and `Query.text` are excluded
from equality: two queries are equal when they mean the same thing, which is what the
round-trip `parse(unparse(q)) == q` relies on.

Normal forms the parser guarantees (so consumers handle one shape per meaning):
- every range is half-open: `0..9` becomes `IndexRange(0, 10)`, `at step 500` becomes
  `StepSel(500, 501, single=True)`; open ends are None;
- a split without brackets, `[*]` and `[:]` are all `AllItems`; one bracketed range is
  an `IndexRange`; anything else (a single index, a list) is an `IndexList`;
- label filters are sorted and deduplicated; options are sorted by name, with synonyms
  folded (`nodes` is `quadrature`) and values typed (`budget` in bytes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Union

# Target kinds written as `kind(split)`; 'label' is also the bare form `on test[0]`.
TARGET_FUNCTIONS = ("label", "loss", "output", "logprob", "prob", "margin")

# A string option value may be written bare when it matches the grammar's VALUE token.
_BARE_VALUE = re.compile(r"[-+]?[A-Za-z0-9_.*:]+([-+][A-Za-z0-9_.*:]+)*")


def _pos() -> Any:
    return field(default=0, compare=False)


@dataclass(frozen=True)
class ComponentRef:
    """One `layer NAME` or `param NAME`; `pattern` may contain `*` globs."""

    kind: Literal["layer", "param"]
    pattern: str
    pos: int = _pos()


@dataclass(frozen=True)
class Components:
    """Selected components; `include == ()` means all of them."""

    include: tuple[ComponentRef, ...]
    exclude: tuple[ComponentRef, ...] = ()
    pos: int = _pos()


@dataclass(frozen=True)
class IndexRange:
    """Half-open item range; None is an open end."""

    start: int | None
    stop: int | None
    pos: int = _pos()


@dataclass(frozen=True)
class IndexList:
    """Items and ranges in the order written (`[1, 3..5]`)."""

    items: tuple[int | IndexRange, ...]
    pos: int = _pos()


@dataclass(frozen=True)
class AllItems:
    """Every item of the split (`test`, `test[*]`, `test[:]`)."""

    pos: int = _pos()


Index = Union[IndexRange, IndexList, AllItems]


@dataclass(frozen=True)
class SplitSel:
    """Items of a recorded split, optionally filtered to some labels."""

    split: str
    index: Index
    where_label: tuple[int, ...] | None = None
    pos: int = _pos()


@dataclass(frozen=True)
class Target:
    """What the influence is measured on.

    kind 'label': the output at each item's label; 'outputs': every output;
    'output': output number `output`; the others name the function of the outputs.
    """

    kind: Literal["label", "outputs", "output", "loss", "logprob", "prob", "margin"]
    items: SplitSel
    output: int | None = None
    pos: int = _pos()


@dataclass(frozen=True)
class StepSel:
    """Half-open step window; `every` thins it (evaluate only); `single` is `at step N`."""

    start: int | None
    stop: int | None
    every: int | None = None
    single: bool = False
    pos: int = _pos()


@dataclass(frozen=True)
class GroupBy:
    """Result keys in the order written; `step_every` bins the `step` key."""

    dims: tuple[str, ...]
    step_every: int | None = None
    pos: int = _pos()


@dataclass(frozen=True)
class Top:
    k: int
    by_abs: bool = False
    pos: int = _pos()


@dataclass(frozen=True)
class Option:
    """One `using` setting, value already typed (int, float or str)."""

    name: str
    value: int | float | str
    pos: int = _pos()


@dataclass(frozen=True)
class Options:
    """`using` settings sorted by name (each name at most once)."""

    items: tuple[Option, ...]
    pos: int = _pos()

    def get(self, name: str, default: int | float | str | None = None) -> int | float | str | None:
        for option in self.items:
            if option.name == name:
                return option.value
        return default

    def as_dict(self) -> dict[str, int | float | str]:
        return {option.name: option.value for option in self.items}


@dataclass(frozen=True)
class Swap:
    """`with COMPONENTS from step N` (evaluate): those components' weights come from step N."""

    components: Components
    from_step: int
    pos: int = _pos()


@dataclass(frozen=True)
class Query:
    """A whole query. `text` is the full text parsed (a script's, for script entries)."""

    measure: str
    components: Components | None = None
    target: Target | None = None
    train: SplitSel | None = None
    steps: StepSel | None = None
    by: GroupBy | None = None
    top: Top | None = None
    options: Options | None = None
    swap: Swap | None = None
    explain: Literal[None, "plan", "analyze"] = None
    text: str = field(default="", compare=False, repr=False)
    pos: int = _pos()

    def to_text(self) -> str:
        return unparse(self)


@dataclass(frozen=True)
class ScriptEntry:
    """One query of an .eql script: its `as NAME` (or None) and its own source text."""

    query: Query
    name: str | None
    source: str
    pos: int = _pos()


def unparse(query: Query) -> str:
    """Canonical text of `query`: parses back to an equal Query."""
    parts = []
    if query.explain:
        parts.append("explain analyze" if query.explain == "analyze" else "explain")
    parts.append(query.measure)
    if query.components is not None:
        parts.append("of " + _components(query.components))
    if query.target is not None:
        parts.append("on " + _target(query.target))
    if query.train is not None:
        parts.append("from " + _split(query.train))
    if query.steps is not None:
        parts.append(_steps(query.steps))
    if query.by is not None:
        every = query.by.step_every
        dims = [d + (f" every {every}" if d == "step" and every is not None else "") for d in query.by.dims]
        parts.append("by " + ", ".join(dims))
    if query.top is not None:
        parts.append(f"top {query.top.k}" + (" abs" if query.top.by_abs else ""))
    if query.options is not None:
        parts.append("using " + ", ".join(f"{o.name} {_value(o.value)}" for o in query.options.items))
    if query.swap is not None:
        parts.append(f"with {_components(query.swap.components)} from step {query.swap.from_step}")
    return " ".join(parts)


def _components(c: Components) -> str:
    text = _refs(c.include) if c.include else "all"
    return text + (" except " + _refs(c.exclude) if c.exclude else "")


def _refs(refs: tuple[ComponentRef, ...]) -> str:
    return ", ".join(f"{r.kind} {r.pattern}" for r in refs)


def _target(t: Target) -> str:
    items = _split(t.items)
    if t.kind == "label":
        # A split named like a target function would lex as that keyword after `on`.
        return f"label({items})" if t.items.split.lower() in TARGET_FUNCTIONS else items
    if t.kind == "outputs":
        return f"output({items})"
    if t.kind == "output":
        return f"output[{t.output}]({items})"
    return f"{t.kind}({items})"


def selection_text(s: SplitSel) -> str:
    """Canonical text of a split selection, as `unparse` writes it (`test[0:4] where label = 1`)."""
    return _split(s)


def _split(s: SplitSel) -> str:
    text = s.split + _index(s.index)
    if s.where_label is not None:
        labels = s.where_label
        text += f" where label = {labels[0]}" if len(labels) == 1 else \
            " where label in (" + ", ".join(map(str, labels)) + ")"
    return text


def _index(index: Index) -> str:
    if isinstance(index, AllItems):
        return ""
    if isinstance(index, IndexRange):
        return f"[{_range(index.start, index.stop)}]"
    return "[" + ", ".join(_range(i.start, i.stop) if isinstance(i, IndexRange) else str(i)
                           for i in index.items) + "]"


def _range(start: int | None, stop: int | None) -> str:
    return f"{'' if start is None else start}:{'' if stop is None else stop}"


def _steps(s: StepSel) -> str:
    if s.single:
        return f"at step {s.start}"
    if s.every is not None:
        return f"at steps {_range(s.start, s.stop)} every {s.every}"
    return f"over steps {_range(s.start, s.stop)}"


def _value(value: int | float | str) -> str:
    if not isinstance(value, str):
        return repr(value)
    if _BARE_VALUE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'

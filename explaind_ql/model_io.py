"""What goes into the model and what comes out, as real models take and give them.

Inputs are a tensor, or a dict or tuple of tensors sharing their leading (item) axis:
Hugging Face models take ``input_ids``, ``attention_mask``, … as keywords. Everything
that indexes, moves or calls on inputs goes through these helpers (``vmap`` takes the
dicts and tuples as they are), so a split may hold either kind.

The output is a tensor, or reached from what the model returns by a recorded *adapter*:
an attribute or key name (``"logits"`` of a ``ModelOutput``) or a position in a tuple.
An adapter is data, never code, so a store can name one safely.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_leaves, tree_map

from .errors import RecordingError

Inputs = Union[torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor, ...]]
Adapter = Union[str, int, None]  # None: the model returns the tensor itself


def apply(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``fn`` on every tensor of ``x`` (an index, a reshape, a move), keeping its structure."""
    return tree_map(fn, x)


def to(x: Inputs, device: torch.device | str, dtype: torch.dtype) -> Inputs:
    """Moved to ``device``; floating tensors cast to ``dtype``, integer ones (token ids, masks) kept."""
    return apply(x, lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device))


def count(x: Inputs) -> int:
    """Items along the leading axis."""
    return len(tree_leaves(x)[0])


def call(model: torch.nn.Module, params: dict[str, torch.Tensor], x: Inputs, output: Adapter) -> torch.Tensor:
    """The model's output tensor on ``x`` with ``params`` in place of its own (dict inputs are keywords)."""
    if isinstance(x, dict):
        out = functional_call(model, params, (), x)
    else:
        out = functional_call(model, params, tuple(x) if isinstance(x, tuple) else (x,))
    return adapt(out, output)


def forward(model: torch.nn.Module, x: Inputs, output: Adapter) -> torch.Tensor:
    """The live model's output on ``x``, through the adapter."""
    out = model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) else model(x)
    return adapt(out, output)


def adapt(out: Any, output: Adapter) -> torch.Tensor:
    if output is None:
        return out
    return out[output] if isinstance(output, int) or isinstance(out, dict) else getattr(out, output)


def adapter_for(out: Any, output: Adapter | str = "auto") -> Adapter:
    """The adapter that reaches a tensor in what the model returned: ``output`` checked, or found (``"auto"``):
    the tensor itself, ``.logits`` (Hugging Face ``ModelOutput``s), else the first of a tuple."""
    if output == "auto":
        if isinstance(out, torch.Tensor):
            return None
        if isinstance(out, dict) and "logits" in out or hasattr(out, "logits"):
            return "logits"
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return 0
        raise RecordingError(f"the model returns {type(out).__name__}, not a tensor; pass output='name' "
                             "(an attribute or key of what it returns) or output=index (a tuple position)")
    if output is not None and not isinstance(output, (str, int)):
        raise RecordingError(f"output= must be an attribute/key name or a tuple position, not {output!r}")
    try:
        got = adapt(out, output)
    except (AttributeError, KeyError, IndexError, TypeError):
        got = None
    if not isinstance(got, torch.Tensor):
        raise RecordingError(f"output={output!r} does not reach a tensor in the model's "
                             f"{type(out).__name__} output; name the attribute, key or position of its logits")
    return output


def parts(x: Inputs, what: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, named tensors) of inputs for storage, checked: tensors all, one length along the item axis."""
    if isinstance(x, torch.Tensor):
        kind, named = "tensor", {"": x}
    elif isinstance(x, dict) and x and all(isinstance(k, str) and k.isidentifier() for k in x):
        kind, named = "dict", dict(x)
    elif isinstance(x, tuple) and x:
        kind, named = "tuple", {str(i): t for i, t in enumerate(x)}
    else:
        raise RecordingError(f"{what} must be a tensor, or a non-empty dict (identifier keys) or tuple of "
                             f"tensors, not {type(x).__name__}")
    bad = [k for k, t in named.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise RecordingError(f"{what}: '{bad[0]}' is {type(named[bad[0]]).__name__}, not a tensor; "
                             "pad and stack the items into tensors")
    lengths = {len(t) for t in named.values()}
    if len(lengths) != 1:
        raise RecordingError(f"{what}: its tensors hold different numbers of items ({sorted(lengths)})")
    return kind, named


def join(kind: str, named: dict[str, torch.Tensor]) -> Inputs:
    """Inverse of :func:`parts`."""
    if kind == "tensor":
        return named[""]
    if kind == "dict":
        return dict(named)
    return tuple(named[str(i)] for i in range(len(named)))

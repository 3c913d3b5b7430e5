"""Engine tensors → polars frames, with key columns named after the ``by`` dimensions.

Schema of an ``influence`` / ``kernel`` frame: the ``by`` keys in the order written
(``test`` and ``example`` are item indices, ``output`` a class index, ``step`` the first
update step of its bin, ``layer``/``param`` names, ``element`` the flat index inside its
``param``), then ``label`` (the training example's label) when ``example`` is a key,
then ``term`` (``gradient``, ``weight_decay``, ``momentum``) and the value ``influence``.
Summing ``influence`` over the frame gives the exact contribution of the selection;
the non-data terms carry null ``example``.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from ..engine.kernels import Result
from ..losses import IGNORE
from ..plan import Plan
from ..run import Run
from ..semantic import Bound

# a rounding term below this share of the largest change is float64 rounding of the rebuild itself
ROUNDING_SHOWN = 1e-12

def _group_keys(plan: Plan, run: Run) -> dict[str, list]:
    """Per engine group: the param / element / layer key values it stands for."""
    g, space = plan.grouping, run.space
    if g.by_element:
        params, elems = [], []
        for name in plan.request.params:
            n = space.by_name[name].numel
            params += [name] * n
            elems += list(range(n))
        return {"param": params, "element": elems}
    if len(g.labels) == len(plan.request.params) and g.labels == tuple(plan.request.params):
        return {"param": list(g.labels)}
    if g.labels == ("all",):
        return {}
    return {"layer": list(g.labels)}


def _long(values: np.ndarray, term: str, axes: tuple[str, ...]) -> pl.DataFrame:
    idx = np.indices(values.shape).reshape(len(values.shape), -1)
    cols = {name: idx[i] for i, name in enumerate(axes)}
    return pl.DataFrame({**cols, "influence": values.reshape(-1)}).with_columns(term=pl.lit(term))


def _distinct(keys: list) -> bool:
    return len(set(keys)) == len(keys)


def _rows_distinct(result: Result, plan: Plan, steps: list, groups: dict[str, list]) -> bool:
    """Whether every engine cell already has its own key: then no regrouping is needed.

    Each key column is a function of one engine axis (bin, target, example, group), so the
    keys are distinct exactly when each axis maps its values to distinct keys.
    """
    dims = set(plan.bound.dims) | ({"param"} if "element" in plan.bound.dims else set())
    B, T, E, G = result.gradient.shape
    return (_distinct(steps) if "step" in dims else B == 1) and \
        _distinct([(t if "test" in dims else None, o if dims & {"output", "token"} else None)
                   for t, o in result.target_labels]) and \
        (E == 1 or "example" in dims and _distinct(result.example_ids.tolist())) and \
        _distinct([tuple(v[g] for k, v in groups.items() if k in dims) for g in range(G)])


def influence_frame(result: Result, plan: Plan, run: Run) -> pl.DataFrame:
    b = plan.bound
    parts = [_long(result.gradient.detach().cpu().numpy(), "gradient", ("_bin", "_t", "_e", "_g"))]
    for term, t in (("weight_decay", result.weight_decay), ("momentum", result.momentum),
                    ("rounding", shown_rounding(result, run))):
        if t is None or not bool(t.any()):
            continue  # no decay in the run, or no momentum carried into a window from a fresh optimizer
        parts.append(_long(t.detach().cpu().numpy(), term, ("_bin", "_t", "_g")).with_columns(_e=pl.lit(None, pl.Int64)))
    df = pl.concat([p.select("_bin", "_t", "_e", "_g", "term", "influence") for p in parts], how="vertical_relaxed")
    # key columns
    every = b.step_every if "step" in b.dims else max(1, b.b - b.a)
    n_in = max(1, -(-(b.b - b.a) // every))
    steps = [b.a + k * every if k < n_in else None for k in range(result.gradient.shape[0])]  # per bin
    df = df.with_columns(step=pl.col("_bin").replace_strict(list(range(len(steps))), steps, return_dtype=pl.Int64))
    tests = [t for t, _ in result.target_labels]
    outs = [o for _, o in result.target_labels]
    df = df.with_columns(test=pl.col("_t").replace_strict(list(range(len(tests))), tests, return_dtype=pl.Int64),
                         output=pl.col("_t").replace_strict(list(range(len(outs))), outs, return_dtype=pl.Int64))
    if "token" in b.dims:  # the output axis holds the predicted positions; padding and -100 labels have none
        df = df.rename({"output": "token"}).filter(_predicted(run, b))
    ex_ids = result.example_ids.numpy().tolist()
    if ex_ids:
        df = df.with_columns(example=pl.col("_e").replace_strict(list(range(len(ex_ids))), ex_ids,
                                                                 return_dtype=pl.Int64, default=None))
    else:
        df = df.with_columns(example=pl.lit(None, pl.Int64))
    groups = _group_keys(plan, run)
    for key, vals in groups.items():
        df = df.with_columns(pl.col("_g").replace_strict(list(range(len(vals))), vals).alias(key))
    if plan.post_filter:
        return _finish(_filter_then_regroup(df, plan, run), b, run)
    return _finish(df, b, run, regroup=not _rows_distinct(result, plan, steps, groups))


def shown_rounding(result: Result, run: Run) -> torch.Tensor | None:
    """The ``rounding`` term a per-example frame shows: the part of the recorded updates that their
    per-example gradients do not rebuild, when it is above float64 rounding of the change."""
    r = result.rounding(run.split_size("train"))
    if r is None or float(r.abs().max()) <= ROUNDING_SHOWN * max(float(result.actual.abs().max()), 1e-300):
        return None
    return r


def _predicted(run: Run, b: Bound) -> pl.Expr:
    """Rows of tokens that some selected item predicts (its label there is not -100)."""
    y = run.split(b.target_split)[1][list(b.test_items), 1:]
    item, pos = (y != IGNORE).nonzero(as_tuple=True)
    if "test" in b.dims:
        pairs = pl.DataFrame({"test": np.asarray(b.test_items)[item.numpy()], "token": pos.numpy() + 1})
        return pl.struct("test", "token").is_in(pairs.to_struct().implode())
    return pl.col("token").is_in(sorted(set((pos + 1).tolist())))


def _filter_then_regroup(df: pl.DataFrame, plan: Plan, run: Run) -> pl.DataFrame:
    """The un-optimised path: drop what the selection excludes, then group to the asked keys."""
    f, b = plan.post_filter, plan.bound
    df = df.filter(pl.col("step").is_not_null() & pl.col("param").is_in(list(f["params"])))
    if f["examples"] is not None:
        df = df.filter(pl.col("example").is_null() | pl.col("example").is_in(list(f["examples"])))
    if "layer" in b.dims:
        df = df.with_columns(layer=pl.col("param").map_elements(run.space.top_layer, return_dtype=pl.String))
    keys = [k for k in ("step", "test", "output", "token", "example", "layer", "param", "element") if k in b.dims]
    if "element" in b.dims and "param" not in keys:
        keys.append("param")
    if "example" not in b.dims:
        df = df.with_columns(example=pl.lit(None, pl.Int64))
    return df.group_by(keys + ["term"], maintain_order=True).agg(pl.col("influence").sum())


def _labelled(run: Run) -> bool:
    y = run.split("train")[1]
    return not y.is_floating_point() and y.dim() == 1


def influence_columns(b: Bound, run: Run) -> tuple[str, ...]:
    """An influence frame's columns: the ``by`` keys as written (``param`` before ``element``), ``label``
    after ``example`` on a classifier's run, then ``term`` and ``influence``."""
    keys = list(b.dims)
    if "element" in keys and "param" not in keys:
        keys.insert(keys.index("element"), "param")
    if "example" in keys and _labelled(run):
        keys.insert(keys.index("example") + 1, "label")
    return (*keys, "term", "influence")


def _finish(df: pl.DataFrame, b: Bound, run: Run, regroup: bool = True) -> pl.DataFrame:
    cols = list(influence_columns(b, run)[:-2])
    if "layer" in cols and "layer" not in df.columns:
        df = df.with_columns(layer=pl.col("param").map_elements(run.space.top_layer, return_dtype=pl.String))
    if "label" in cols:
        y = run.split("train")[1]
        lab = pl.DataFrame({"example": np.arange(len(y), dtype=np.int64), "label": y.numpy().astype(np.int64)})
        df = df.join(lab, on="example", how="left", maintain_order="left")
    if "term" not in df.columns:
        df = df.with_columns(term=pl.lit("gradient"))
    df = df.select(cols + ["term", "influence"])
    if regroup:  # unless every row has its own key already: a hash group-by costs memory
        df = df.group_by(cols + ["term"], maintain_order=True).agg(pl.col("influence").sum())
    if b.top:  # with an example key, top k ranks the training examples; the other terms follow them, unranked
        order = pl.col("influence").abs() if b.top_abs else pl.col("influence")
        ranked, beside = (df, None) if "example" not in cols else (
            df.filter(pl.col("example").is_not_null()), df.filter(pl.col("example").is_null()))
        df = ranked.sort(order, descending=True).head(b.top)
        if beside is not None:
            df = pl.concat([df, beside])
    return df


def residual_line(stats: dict) -> str | None:
    """What the last influence result achieved, in one line: its replication residual and the rule.

    The residual is the exact change F(θ_b) − F(θ_a) of the targets against the sum of all their
    terms (largest over targets, and relative to the largest change), the ``rounding`` term's share
    with it when a per-example frame has one. A restricted selection
    (some params, some training examples) has no exact change to compare with; a fixed rule
    says it is not adaptive.
    """
    if "residual" not in stats:
        return None
    rel = stats["residual"] / stats["change"] if stats["change"] else 0.0
    rule = (f"adaptive to {stats['tolerance']:g}" if stats.get("tolerance") is not None
            else f"fixed {stats.get('nodes')}-node rule, not adaptive: its error is this residual")
    unconverged = len(stats.get("unconverged_steps", []))
    tail = f", {unconverged} steps unconverged" if unconverged else ""
    line = f"replication residual {stats['residual']:.2e} ({rel:.2e} of the change; {rule}{tail})"
    if stats.get("rounding", 0.0) > ROUNDING_SHOWN * stats["change"]:
        line += (f"; the 'rounding' term holds {stats['rounding'] / stats['change']:.2e} of the change, what the "
                 "per-example gradients do not rebuild of the recorded updates (none in a float64 recording)")
    return line

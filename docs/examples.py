"""Regenerate the example outputs in docs/language.md: ``python docs/examples.py > /tmp/out.md``.

``python docs/examples.py --readme`` prints the README's "language at a glance" block instead
(five queries, compact tables); ``tests/test_readme.py`` checks the README against it.
Every example runs on the toy modular-addition transformer (p = 5) recorded by
``explaind_ql.toy.record_toy(path, "transformer", "adamw", steps=12)``.
"""

import sys
import tempfile

import polars as pl

import explaind_ql as eq
from explaind_ql.toy import record_toy

EXAMPLES = [
    "influence on test[*] by layer",
    "influence of layer emb on test[0..3] over steps 2:10 by example top 4 abs",
    "influence of all except layer attn on test[0, 2] by layer, step every 4",
    "influence on loss(test[*]) from train where label = 2 by example",
    "influence on output(test[0]) by output top 3",
    "influence of param attn.W on test[0] by element top 3 abs",
    "kernel on test[0..1] from train[0..2]",
    "check on test[*]",
    "similarity of layer emb on test[0..2]",
    "evaluate on test[*] at steps 0:12 every 4 with layer emb from step 12",
    "explain influence of layer emb on test[0..3] over steps 2:10 by example",
]

README_EXAMPLES = [
    "influence on test[*] by layer",
    "influence of layer emb on test[0..3] over steps 2:10 by example top 4 abs",
    "kernel on test[0..1] from train[0..2]",
    "check on test[*]",
    "evaluate on test[*] at steps 0:12 every 4 with layer emb from step 12",
]


def readme_config() -> pl.Config:
    """How the README prints frames: no shape line, no dtypes, at most 8 rows, wide enough for `check`."""
    return pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_rows=8,
                     tbl_width_chars=200, tbl_cols=10, fmt_str_lengths=40)


def readme_block(run) -> str:
    """The README's block: each query after ``>>>``, then its frame as the README prints it."""
    with readme_config():
        return "\n\n".join(f">>> {q}\n{run.query(q)}" for q in README_EXAMPLES)


def main() -> None:
    if sys.argv[1:] == ["--readme"]:
        with tempfile.TemporaryDirectory() as d:
            run = eq.open(record_toy(f"{d}/toy.zarr", "transformer", "adamw", steps=12))
            sys.stdout.write(f"```\n{readme_block(run)}\n```\n")
        return
    pl.Config.set_tbl_rows(12)
    pl.Config.set_tbl_width_chars(160)
    pl.Config.set_tbl_cols(10)
    pl.Config.set_fmt_str_lengths(110)
    with tempfile.TemporaryDirectory() as d:
        run = eq.open(record_toy(f"{d}/toy.zarr", "transformer", "adamw", steps=12))
        for q in EXAMPLES:
            out = run.explain(q.removeprefix("explain ")) if q.startswith("explain") else run.query(q)
            sys.stdout.write(f"```\n>>> {q}\n{out}\n```\n\n")


if __name__ == "__main__":
    main()

"""The command line: in-process through click's CliRunner, and as the installed `explaind-ql`.

Exit codes are the contract scripts rely on: 0 ok, 2 usage or syntax, 3 semantic, 4 runtime.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import polars as pl
import pytest
from click.testing import CliRunner

import explaind_ql as eq
from explaind_ql.shells.cli import main, typed_value, with_options
from explaind_ql.results.formats import render_table
from explaind_ql.lang import parse

QUERY = "influence on test[0..1] by layer"
SCRIPT = """\
-- a script with defaults and named results
param $last = 3;
param $layer = emb;
influence of layer $layer on test[0..$last] by layer as per_layer;
check on test[0..1];   -- unnamed: printed
kernel on test[0] from train[0..2] as kern;
"""


# Toy-sized queries are dominated by thread hand-offs: one thread is several times faster,
# by far so on a loaded machine. Subprocesses get the same through the environment.
SINGLE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}






@pytest.fixture(scope="module")
def other_run(toy_run) -> str:
    return str(toy_run("mlp", "sgd", steps=12))


@pytest.fixture(scope="module")
def broken_run(run_path, tmp_path_factory) -> str:
    """A copy of the run with its root metadata overwritten by garbage."""
    path = tmp_path_factory.mktemp("broken") / "broken.zarr"
    shutil.copytree(run_path, path)
    (path / "zarr.json").write_text("this is not json")
    return str(path)


@pytest.fixture(scope="module")
def expected(run_path) -> pl.DataFrame:
    return eq.query(run_path, QUERY)


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def assert_frames_close(got: pl.DataFrame, want: pl.DataFrame, rtol: float = 1e-9) -> None:
    assert got.columns == want.columns and got.height == want.height
    for column in want.columns:
        if want[column].dtype.is_float():
            diff = (got[column] - want[column]).abs().max()
            assert diff <= rtol * max(want[column].abs().max(), 1e-300)
        else:
            assert got[column].to_list() == want[column].to_list()


# ------------------------------------------------------------------------------ start-up

def test_help_does_not_import_torch():
    """`--help` (group and every command) must not pay for torch's import."""
    snippet = (
        "import sys\n"
        "from explaind_ql.shells import cli\n"
        "for args in (['--help'], *[[c, '--help'] for c in cli.main.commands]):\n"
        "    try:\n"
        "        cli.main(args, standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, 'polars' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False False"


def test_package_names_resolve_lazily():
    """`explaind_ql/__init__` defers its torch imports; the public names still resolve."""
    from explaind_ql import Recorder, Run, compare, explain, query
    from explaind_ql.api import compare as api_compare
    from explaind_ql.recorder import Recorder as recorder_class
    assert Recorder is recorder_class and eq.Run is Run and compare is api_compare
    assert {"Recorder", "Run", "compare", "explain", "query", "open", "ExplaindError"} <= set(dir(eq))
    assert explain.__module__ == query.__module__ == "explaind_ql.api"
    with pytest.raises(AttributeError):
        eq.no_such_name


def test_console_script_help_is_fast():
    start = time.perf_counter()
    done = subprocess.run(["explaind-ql", "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and "query" in done.stdout and "repl" in done.stdout
    assert elapsed < 5, f"explaind-ql --help took {elapsed:.2f} s"


# ------------------------------------------------------------------------------ formats

@pytest.mark.parametrize("fmt", ["table", "csv", "json", "ndjson"])
def test_query_prints_every_format(run_path, expected, fmt):
    result = invoke("query", run_path, QUERY, "--format", fmt)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    if fmt == "table":
        lines = out.rstrip("\n").split("\n")
        assert lines[0].split() == expected.columns and set(lines[1]) <= {"-", " "}
        assert len(lines) == expected.height + 2
        assert [line.split()[:2] for line in lines[2:]] == [list(r) for r in expected.select("layer", "term").rows()]
    elif fmt == "csv":
        assert_frames_close(pl.read_csv(io.StringIO(out)), expected)
    elif fmt == "json":
        assert_frames_close(pl.DataFrame(json.loads(out)), expected)
    else:
        assert_frames_close(pl.DataFrame([json.loads(line) for line in out.splitlines()]), expected)


def test_out_file_format_from_option_or_extension(run_path, expected, tmp_path):
    assert invoke("query", run_path, QUERY, "--format", "parquet").exit_code == 2  # parquet needs --out
    for name, fmt, read in (("r.parquet", None, pl.read_parquet), ("r.csv", None, pl.read_csv),
                            ("r.data", "parquet", pl.read_parquet), ("r.ndjson", None, pl.read_ndjson)):
        args = ["query", run_path, QUERY, "--out", str(tmp_path / name)] + (["--format", fmt] if fmt else [])
        result = invoke(*args)
        assert result.exit_code == 0 and result.stdout == ""
        assert_frames_close(read(tmp_path / name), expected)
    assert invoke("query", run_path, QUERY, "--out", str(tmp_path / "r.txt")).exit_code == 0
    assert (tmp_path / "r.txt").read_text().startswith("layer")


def test_table_keeps_every_row_and_prints_plans_as_lines():
    frame = pl.DataFrame({"step": list(range(500)), "influence": [0.5] * 500})
    assert len(render_table(frame).splitlines()) == 502
    assert render_table(pl.DataFrame({"plan": ["Influence", "└─ Contract"]})) == "Influence\n└─ Contract"
    assert render_table(frame.head(0)).endswith("(no rows)")


def test_query_words_are_joined(run_path, expected):
    result = invoke("query", run_path, *QUERY.split(), "--format", "csv")
    assert result.exit_code == 0
    assert_frames_close(pl.read_csv(io.StringIO(result.stdout)), expected)


# ------------------------------------------------------------------------------ exit codes

@pytest.mark.parametrize("query, code, fragment", [
    ("influence on test[0..1] by layr", 2, "syntax error at line 1, column 28"),
    ("influence of layer nope on test[0]", 3, "unknown layer 'nope'"),
    ("influence on test[0..99]", 3, "out of range"),
    ("influence on test[0..$k]", 2, "missing parameter $k"),
    ("influence on test[*] by layer using budget 1", 4, "budget"),
])
def test_query_errors_map_to_exit_codes(run_path, query, code, fragment):
    result = invoke("query", run_path, query)
    assert result.exit_code == code
    assert fragment in result.stderr and result.stdout == ""
    assert "Traceback" not in result.output
    if code in (2, 3):  # located in the query: message, the query line, a caret line
        message, source, caret = result.stderr.rstrip("\n").split("\n")
        assert source.strip() == query and caret.strip() == "^"


def test_corrupted_and_missing_stores_exit_4(run_path, broken_run, tmp_path):
    for path in (broken_run, str(tmp_path / "missing.zarr")):
        result = invoke("query", path, QUERY)
        assert result.exit_code == 4 and len(result.stderr.strip().splitlines()) == 1
    assert invoke("info", broken_run).exit_code == 4


@pytest.mark.parametrize("args", [
    ["query"],                                  # no RUN or QUERY
    ["query", "only-a-query"],                  # QUERY without RUN
    ["query", "r.zarr", "q", "--param", "k"],   # not NAME=VALUE
    ["query", "r.zarr", "q", "--format", "xml"],
    ["run", "r.zarr", "missing.eql"],
    ["nosuchcommand"],
])
def test_usage_errors_exit_2(args):
    assert CliRunner().invoke(main, args).exit_code == 2


# ------------------------------------------------------------------------------ options

def test_param_values_are_typed():
    assert [typed_value(v) for v in ("3", "-2", "0.5", "1e-6", "emb", "cuda:0")] == [3, -2, 0.5, 1e-6, "emb", "cuda:0"]


def test_params_bind_query_variables(run_path, expected):
    result = invoke("query", run_path, "influence on test[0..$k] by layer", "--param", "k=1", "--format", "csv")
    assert result.exit_code == 0
    assert_frames_close(pl.read_csv(io.StringIO(result.stdout)), expected)


def test_device_and_dtype_join_the_using_clause():
    assert with_options("influence on test", {}, "cpu") == "influence on test\nusing device cpu"
    assert with_options("influence on test; -- hi", {}, dtype="float32") == "influence on test\nusing dtype float32"
    merged = with_options("influence using quadrature 4 on test", {}, "cpu", "float32")
    assert merged == "influence using device cpu, dtype float32, quadrature 4 on test"
    assert with_options("influence on test using device cpu", {}, "CPU") == "influence on test using device cpu"
    with pytest.raises(click.UsageError, match="conflicts with 'using dtype float64'"):
        with_options("influence on test using dtype float64", {}, dtype="float32")
    assert parse(merged).options.as_dict() == {"device": "cpu", "dtype": "float32", "quadrature": 4}


def test_dtype_option_runs_in_float32(run_path, expected):
    result = invoke("query", run_path, QUERY, "--dtype", "float32", "--device", "cpu", "--format", "csv")
    assert result.exit_code == 0
    assert_frames_close(pl.read_csv(io.StringIO(result.stdout)), expected, rtol=1e-3)
    conflict = invoke("query", run_path, QUERY + " using dtype float64", "--dtype", "float32")
    assert conflict.exit_code == 2 and "conflicts" in conflict.stderr


def test_compare_runs_with_run_option(run_path, other_run):
    result = invoke("query", "--run", run_path, "--run", other_run, "influence on test[0..1] by layer",
                    "--format", "csv")
    assert result.exit_code == 0, result.stderr
    frame = pl.read_csv(io.StringIO(result.stdout))
    names = [Path(p).name.removesuffix(".zarr") for p in (run_path, other_run)]
    assert frame.columns[0] == "run" and frame["run"].unique(maintain_order=True).to_list() == names
    assert_frames_close(frame.filter(pl.col("run") == names[1]).drop("run"),
                        eq.query(other_run, "influence on test[0..1] by layer"))
    glob = str(Path(run_path).parent / "*.zarr")
    by_glob = invoke("query", "--run", glob, "check on test[0]", "--format", "csv")
    assert by_glob.exit_code == 0 and set(names) <= set(pl.read_csv(io.StringIO(by_glob.stdout))["run"])
    assert invoke("query", "--run", str(Path(run_path).parent / "none*.zarr"), QUERY).exit_code == 2


def test_runs_named_alike_are_told_apart_by_their_paths_or_named_by_the_user(run_path, tmp_path):
    import shutil
    for seed in ("seed0", "seed1"):
        shutil.copytree(run_path, tmp_path / "runs" / seed / "run.zarr")
    both = invoke("query", "--run", str(tmp_path / "runs" / "*" / "run.zarr"), "check on test[0]", "--format", "csv")
    assert both.exit_code == 0, both.stderr
    assert pl.read_csv(io.StringIO(both.stdout))["run"].to_list() == ["seed0/run", "seed1/run"]
    named = invoke("query", "--run", f"wd1={tmp_path / 'runs' / 'seed0' / 'run.zarr'}",
                   "--run", str(tmp_path / "runs" / "seed1" / "run.zarr"), "check on test[0]", "--format", "csv")
    assert named.exit_code == 0, named.stderr
    assert pl.read_csv(io.StringIO(named.stdout))["run"].to_list() == ["wd1", "run"]
    twice = invoke("query", "--run", f"a={run_path}", "--run", f"a={run_path}", "check on test[0]")
    assert twice.exit_code == 2 and "named 'a'" in twice.stderr


def test_plot_option_writes_an_image(run_path, tmp_path):
    result = invoke("query", run_path, "influence on test[0..1] by layer, step every 4", "--plot",
                    str(tmp_path / "steps.png"), "--format", "csv")
    assert result.exit_code == 0 and (tmp_path / "steps.png").read_bytes()[:4] == b"\x89PNG"
    for query in ("check on test[0..2]", "influence on test[0..1] by example", "evaluate on test[*]"):
        plotted = invoke("query", run_path, query, "--plot", str(tmp_path / "p.png"))
        assert plotted.exit_code == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG", query
    unplottable = invoke("query", run_path, "similarity on test[0..2]", "--plot", str(tmp_path / "no.png"))
    assert unplottable.exit_code == 2 and "cannot plot" in unplottable.stderr
    assert unplottable.stdout == "" and len(unplottable.stderr.strip().splitlines()) == 1  # refused before it runs


def test_out_file_with_an_extension_that_names_no_format_is_refused(run_path, tmp_path):
    result = invoke("query", run_path, QUERY, "--out", str(tmp_path / "x.xlsx"))
    assert result.exit_code == 2 and "x.xlsx" in result.stderr and ".csv" in result.stderr
    assert not (tmp_path / "x.xlsx").exists()


# ------------------------------------------------------------------------------ .eql scripts

def test_run_script_with_params_and_named_results(run_path, tmp_path):
    script = tmp_path / "analysis.eql"
    script.write_text(SCRIPT)
    out = tmp_path / "results"
    result = invoke("run", run_path, str(script), "--param", "last=1", "--out", str(out), "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["kern.json", "per_layer.json"]
    per_layer = pl.read_json(out / "per_layer.json")
    assert_frames_close(per_layer, eq.query(run_path, "influence of layer emb on test[0..1] by layer"))
    printed = pl.DataFrame(json.loads(result.stdout))  # only the unnamed check result
    assert printed["test"].to_list() == [0, 1]
    # without --out, named results land next to the script; table output names them .csv
    result = invoke("run", run_path, str(script))
    assert result.exit_code == 0
    assert (tmp_path / "per_layer.csv").is_file() and (tmp_path / "kern.csv").is_file()
    defaults = pl.read_csv(tmp_path / "per_layer.csv")
    assert_frames_close(defaults, eq.query(run_path, "influence of layer emb on test[0..3] by layer"))
    assert result.stdout.splitlines()[0].split()[:3] == ["test", "actual", "explained"]


def test_run_script_errors_name_the_query(run_path, tmp_path):
    script = tmp_path / "bad.eql"
    script.write_text(SCRIPT)
    result = invoke("run", run_path, str(script), "--param", "layer=nope")
    assert result.exit_code == 3 and "query 1 (line 4)" in result.stderr and "unknown layer 'nope'" in result.stderr
    script.write_text("check on test[0];\ninfluence of on test;\n")
    result = invoke("run", run_path, str(script))
    assert result.exit_code == 2 and result.stderr.startswith(f"{script}: syntax error at line 2")
    script.write_text("check on test[0];\n")
    assert invoke("run", run_path, str(script), "--format", "parquet").exit_code == 2  # unnamed parquet


def test_run_script_over_several_runs(run_path, other_run, tmp_path):
    script = tmp_path / "cmp.eql"
    script.write_text("check on test[0] as checks;\n")
    result = invoke("run", "--run", run_path, "--run", other_run, str(script), "--out", str(tmp_path))
    assert result.exit_code == 0
    assert pl.read_csv(tmp_path / "checks.csv")["run"].n_unique() == 2


# ------------------------------------------------------------------------------ other commands

def test_explain_prints_the_plan(run_path):
    result = invoke("explain", run_path, "influence on test[*] by layer")
    assert result.exit_code == 0 and "Contract" in result.stdout and "passes:" in result.stdout
    assert invoke("explain", run_path, "influence of layer nope").exit_code == 3


def test_info_summarises_the_run(run_path):
    result = invoke("info", run_path)
    assert result.exit_code == 0
    for word in ("steps", "12", "emb", "linear1", "unembed", "train", "test", "AdamW", "on disk", "weight_decay"):
        assert word in result.stdout
    info = json.loads(invoke("info", run_path, "--json").stdout)
    assert info["steps"] == 12 and info["splits"] == {"train": 10, "test": 5}


def test_repl_reads_piped_input(run_path):
    session = "influence on test[0..1]\n  by layer;\n.format csv\ncheck on test[0];\n.quit\n"
    result = invoke("repl", run_path, input=session)
    assert result.exit_code == 0
    failing = invoke("repl", run_path, input="influence of layer nope;\ncheck on test[0];\n")
    assert failing.exit_code == 3 and "unknown layer" in failing.stdout and "actual" in failing.stdout
    assert invoke("repl", run_path, input="influence on tset[0] by layer;\n").exit_code == 3
    assert "linear1" in result.stdout and "format csv" in result.stdout and "test,actual" in result.stdout


def test_demo_without_the_demo_module_exits_4():
    if importlib.util.find_spec("explaind_ql.demo") is not None:
        pytest.skip("explaind_ql.demo exists: the demo itself is tested with it")
    result = CliRunner().invoke(main, ["demo", "--quick"])
    assert result.exit_code == 4 and result.stderr.count("\n") == 1 and "demo" in result.stderr


# ------------------------------------------------------------------------------ the real script

def test_console_script_exit_codes(run_path, broken_run, tmp_path):
    """The installed entry point, all at once (each process pays torch's import)."""
    cases = {
        "ok": (["query", run_path, QUERY, "--format", "csv"], 0),
        "syntax": (["query", run_path, "influence on test[0..1] by layr"], 2),
        "semantic": (["query", run_path, "influence of layer nope on test[0]"], 3),
        "corrupted": (["query", broken_run, QUERY], 4),
    }
    if importlib.util.find_spec("explaind_ql.demo") is None:
        cases["demo"] = (["demo", "--out", str(tmp_path)], 4)
    procs = {name: subprocess.Popen(["explaind-ql", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=SINGLE_THREAD_ENV)
             for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == cases[name][1], (name, stderr)
        assert "Traceback" not in stderr
        if name == "ok":
            assert stdout.startswith("layer,term,influence")  # the table alone on stdout, the residual under it
            assert re.fullmatch(r"replication residual \S+ \(\S+ of the change; adaptive to 1e-06\)\n", stderr)
        else:
            assert stdout == "" and stderr.strip()

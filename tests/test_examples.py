"""The CNN pruning example (examples/cnn), end to end in a reduced mode: train + record, the
decomposition's check, influence / magnitude / random scores, one-shot pruning, the report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

import explaind_ql

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "examples" / "cnn"
pytest.importorskip("sklearn", reason="the CNN example's data set ships with scikit-learn (the test extra)")


def load(name: str):
    """``examples/cnn/<name>.py`` as a module (prune.py imports train.py from beside itself)."""
    spec = importlib.util.spec_from_file_location(f"cnn_example_{name}", CNN / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prune = load("prune")
TINY = dict(epochs=2, n_train=300, n_val=30, n_test=120)  # 12 SGD steps


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn")
    return prune.experiment(seeds=(0,), fractions=(0.0, 0.5, 0.9), out_dir=out, checks="all", log=False, **TINY)


def test_the_decomposition_replicates_the_run(result):
    check = result["per_seed"][0]["check"]
    assert check["query"] == f"check on test[*] using quadrature {prune.QUADRATURE}"
    assert check["items"] == TINY["n_test"] and check["unconverged_steps"] == 0
    assert check["max_abs_change"] > 1e-2  # the run moved the logits ...
    assert check["max_relative_residual"] < 1e-9  # ... and the decomposition sums to that change
    assert check["max_update_error"] < 1e-12  # the recorded SGD (momentum, nesterov, decay) is the real one


def test_the_run_is_recorded_with_three_splits_and_sgd(result):
    run = explaind_ql.open(_store(result))
    assert run.n_steps == result["per_seed"][0]["steps"] == 12 and run.closed
    assert {s: run.split_size(s) for s in ("train", "val", "test")} == {"train": 300, "val": 30, "test": 120}
    hyper = run.optimizer["groups"][0]
    assert run.optimizer["class"] == "SGD" and hyper["momentum"] == 0.9 and hyper["nesterov"] is True
    assert run.info()["factory"] == "explaind_ql.models:TinyCNN"


def _store(result) -> Path:
    return Path(result["per_seed"][0]["store"])


def test_every_method_and_fraction_is_evaluated_on_test(result):
    frame = result["frame"]
    assert frame.height == len(prune.METHODS) * 3
    assert set(frame["method"]) == set(prune.METHODS) and sorted(set(frame["fraction"])) == [0.0, 0.5, 0.9]
    unpruned = frame.filter(pl.col("fraction") == 0.0)
    acc = result["per_seed"][0]["test_acc"]
    assert (unpruned["accuracy"] == acc).all()  # pruning nothing is the unpruned model
    assert (unpruned["agreement"] == 1.0).all() and (unpruned["kl"].abs() < 1e-12).all()
    heavy = frame.filter(pl.col("fraction") == 0.9)
    assert (heavy["kl"] > 0).all()  # removing 90 % of the weights changes every model


def test_report_has_the_command_the_check_and_a_table_per_metric(result):
    text = prune.report(result, "python examples/cnn/prune.py --seeds 0")
    assert text.count("```bash\npython examples/cnn/prune.py --seeds 0\n```") == 1
    assert "Measured wall time:" in text and f"check on test[*] using quadrature {prune.QUADRATURE}" in text
    header = "| pruned | " + " | ".join(prune.METHODS) + " |"
    assert text.count(header) == 3  # accuracy, agreement, KL
    for f in ("| 0% |", "| 50% |", "| 90% |"):
        assert text.count(f) == 3


def test_prune_zeroes_the_lowest_scored_weights_globally():
    torch.manual_seed(0)
    from explaind_ql.models import TinyCNN

    model = TinyCNN(1, 10, 8).double()
    params = dict(model.named_parameters())
    scores = {n: torch.rand(params[n].shape, dtype=torch.float64) for n in prune.WEIGHTS}
    pruned = dict(prune.prune(model, scores, 0.3).named_parameters())
    flat = torch.cat([scores[n].reshape(-1) for n in prune.WEIGHTS])
    k = round(0.3 * flat.numel())
    cut = flat.sort().values[k - 1]
    for n in prune.WEIGHTS:
        zero = pruned[n] == 0
        assert torch.equal(zero, scores[n] <= cut)  # the k lowest, across the three tensors
        assert torch.equal(pruned[n][~zero], params[n][~zero])
    assert sum(int((pruned[n] == 0).sum()) for n in prune.WEIGHTS) == k
    for n in ("conv1.bias", "conv2.bias", "head.bias"):  # biases are never pruned
        assert torch.equal(pruned[n], params[n])
    assert not any(bool((p == 0).any()) for p in model.parameters())  # the model itself is untouched


def test_influence_scores_bound_the_net_influence(result):
    """``Σ_items |I|`` ≥ ``|Σ_items I|`` element by element (the two influence methods' scores)."""
    paper, net = prune.influence_scores(_store(result), f"quadrature {prune.QUADRATURE}")
    for n in prune.WEIGHTS:
        assert paper[n].shape == net[n].shape and paper[n].numel() > 0
        assert bool((paper[n] >= net[n] - 1e-15).all()) and bool((paper[n] > 0).any())


def test_the_command_line_writes_results_md(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prune.py"])
    argv = ["--seeds", "0", "--epochs", "1", "--n-train", "100", "--n-val", "10", "--n-test", "50",
            "--fractions", "0", "0.5", "--check", "none", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "RESULTS.md")]
    out = prune.main(argv)
    text = out.read_text()
    assert out == tmp_path / "RESULTS.md" and "wrote" in capsys.readouterr().out
    assert "python examples/cnn/prune.py --seeds 0 --epochs 1" in text and "## Replication" not in text
    assert (tmp_path / "runs" / "seed0.zarr").exists()


@pytest.mark.parametrize("query", ["influence on val[*] by layer", "influence on val[0..9] by example",
                                   "check on test[0..31]", "evaluate on test[*]"])
def test_explain_estimates_the_examples_queries_within_3x(result, query):
    """The example run's own queries: explain analyze's estimate against what ran (time, evaluations, memory)."""
    from test_estimate import ratios
    run = explaind_ql.open(_store(result))
    r = ratios(run.query(f"explain analyze {query}")["plan"].to_list())
    for what, ratio in r.items():
        assert ratio is None or 1 / 3 <= ratio <= 3, (what, ratio)

"""Hugging Face models as they come: dict batches, ModelOutputs, dropout on, no wrapper, no factory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import explaind_ql as eq
from explaind_ql.errors import RecordingError, StoreError
from explaind_ql.hf import architecture
from explaind_ql.losses import LossSpec

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB, N_TRAIN, N_TEST, LENGTH = 32, 16, 6, 8


def tiny_gpt2(dtype=torch.float64) -> torch.nn.Module:
    """GPT-2 as its config makes it: dropout 0.1 everywhere, SDPA attention, tied embeddings."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (N_TRAIN + N_TEST, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0  # right padding on every third sequence
    return ids, mask


def record_gpt2(path, dtype=torch.float64, steps=5, hf_loss=True):
    """A user's loop as it comes: the model computes its own loss from ``labels`` (or the loop does, in dtype)."""
    model = tiny_gpt2(dtype)
    ids, mask = sequences()
    train = {"input_ids": ids[:N_TRAIN], "attention_mask": mask[:N_TRAIN]}
    test = {"input_ids": ids[N_TRAIN:], "attention_mask": mask[N_TRAIN:]}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    with eq.Recorder(path, model, opt, train=train, test=test, loss="lm", dropout_seed=5) as rec:
        for _ in range(steps):
            b = torch.randperm(N_TRAIN, generator=g)[:8]
            labels = ids[b].masked_fill(mask[b] == 0, -100)
            if hf_loss:
                loss = model(input_ids=ids[b], attention_mask=mask[b], labels=labels).loss
            else:
                logits = model(input_ids=ids[b], attention_mask=mask[b]).logits
                loss = LossSpec("lm").per_example(logits, labels).sum() / (labels[:, 1:] != -100).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(b, loss=loss)
    return path


def test_gpt2_is_recorded_as_it_comes_and_rebuilt_from_its_config(tmp_path):
    path = record_gpt2(tmp_path / "g.zarr")
    run = eq.open(path)
    assert run.attrs["hf"]["class"] == "GPT2LMHeadModel" and run.attrs["factory"] is None
    assert run.attrs["output"] == "logits" and run.attrs["inputs"] == "dict"
    assert run.dropout_seed is not None  # GPT-2's dropout drew masks, and a query replays them
    check = run.query("check on loss(test[0..5])")
    assert float(check["relative_residual"].abs().max()) < 1e-6
    # the same with the architecture given at analysis time (any weights: the store's replace them)
    again = eq.open(path, model=tiny_gpt2()).query("check on loss(test[0..5])")
    assert float((again["actual"] - check["actual"]).abs().max()) < 1e-12
    layers = run.query("influence on loss(test[0..5]) by layer")
    assert "transformer.h.0.mlp.c_fc" in set(layers["layer"])
    assert "kink" not in run.explain("influence on loss(test[0..5]) by layer")  # GELU: nothing to split at
    assert abs(float(layers["influence"].sum()) - float(check["actual"].sum())) < 1e-6 * float(check["actual"].abs().sum())


def test_gpt2_per_example_terms_with_dropout_sum_to_the_update(tmp_path):
    """Per-example terms of a dropout-on GPT-2 rebuild the recorded update (invariant 3) and sum to the change.

    The loop takes its loss in float64: Hugging Face's own LM loss upcasts the logits to float32 even for a
    float64 model, so its updates carry float32 rounding that no float64 rebuild reproduces (1e-4 measured)."""
    run = eq.open(record_gpt2(tmp_path / "g.zarr", hf_loss=False))
    check = run.query("check on loss(test[0..5])")
    assert float(check["max_update_error"].max()) < 1e-9
    by_ex = run.query("influence on loss(test[0..5]) by example")
    actual = float(check["actual"].sum())
    assert abs(float(by_ex["influence"].sum()) - actual) < 1e-6 * max(1.0, abs(actual))
    logprob = run.query("check on logprob(test[0..5])")
    assert float((logprob["actual"] + check["actual"]).abs().max()) < 1e-12  # a sequence's logprob is −its loss


def test_float32_gpt2_passes_check(tmp_path):
    run = eq.open(record_gpt2(tmp_path / "g.zarr", dtype=torch.float32))
    check = run.query("check on loss(test[0..5])")
    assert float(check["relative_residual"].abs().max()) < 1e-4


def test_vit_image_classifier_with_dropout(tmp_path):
    """A vision transformer taking a tensor and returning an ImageClassifierOutput, dropout on."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3,
                                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = transformers.ViTForImageClassification(cfg).double()
    x, y = torch.randn(20, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (20,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with eq.Recorder(tmp_path / "v.zarr", model, opt, train=(x[:14], y[:14]), test=(x[14:], y[14:])) as rec:
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(model(x[:14]).logits, y[:14]).backward()
            opt.step()
            rec.step(torch.arange(14))
    run = eq.open(tmp_path / "v.zarr")
    assert run.attrs["hf"]["class"] == "ViTForImageClassification" and run.dropout_seed is not None
    check = run.query("check on test[*]")
    assert float(check["max_update_error"].max()) < 1e-9
    by_ex = run.query("influence on test[*] by example")
    assert abs(float(by_ex["influence"].sum()) - float(check["actual"].sum())) < 1e-6


def test_lm_labels_weights_and_padding():
    """The LM preset: labels from input_ids, padding (attention_mask 0) ignored, weight 1/(predicted tokens)."""
    from explaind_ql.recorder import _split
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    x, y = _split("train", {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])},
                  LossSpec("lm"))
    assert y.tolist() == [[1, 2, 3, 4], [5, 6, -100, -100]] and set(x) == {"input_ids", "attention_mask"}
    assert LossSpec("lm").weight(y) == 1 / 4  # 3 + 1 predicted tokens
    logits = torch.randn(2, 4, 9, dtype=torch.float64)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 9), y[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert torch.allclose(LossSpec("lm").per_example(logits, y).sum(), ref)
    with pytest.raises(RecordingError, match="without 'labels'"):
        _split("train", {"pixel_values": torch.zeros(2, 3)}, LossSpec("cross_entropy"))


def test_a_store_names_only_transformers_own_classes(tmp_path):
    spec = architecture.describe(tiny_gpt2())
    with pytest.raises(StoreError, match="not a transformers model class"):
        architecture.rebuild({**spec, "class": "pipeline"})
    with pytest.raises(StoreError, match="remote code"):
        architecture.rebuild({**spec, "config": {**spec["config"], "auto_map": {"AutoModel": "evil.Model"}}})
    with pytest.raises(StoreError, match="damaged"):
        architecture.rebuild({"class": 3})


def _trainer(tmp_path, dtype=torch.float64, callback_kw=None, collate=None, **args):
    """A tiny GPT-2 fine-tuned by transformers.Trainer on variable-length sequences, recorded by the callback."""
    from transformers import Trainer, TrainingArguments

    from explaind_ql.hf import Callback
    model = tiny_gpt2(dtype)
    ids = torch.randint(1, VOCAB, (30, LENGTH), generator=torch.Generator().manual_seed(2))
    items = [{"input_ids": ids[i, : 5 + i % 4]} for i in range(30)]

    def pad(batch):  # dynamic padding to the batch's longest sequence, as HF collators do
        longest = max(len(it["input_ids"]) for it in batch)
        x = torch.zeros(len(batch), longest, dtype=torch.long)
        m = torch.zeros_like(x)
        for i, it in enumerate(batch):
            x[i, : len(it["input_ids"])] = it["input_ids"]
            m[i, : len(it["input_ids"])] = 1
        return {"input_ids": x, "attention_mask": m, "labels": x.masked_fill(m == 0, -100)}
    settings = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2, max_steps=6, warmup_steps=2, max_grad_norm=0.5,
                    learning_rate=1e-2, save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0)
    callback = Callback(tmp_path / "t.zarr", test=items[24:], **(callback_kw or {}))
    trainer = Trainer(model=model, args=TrainingArguments(**{**settings, **args}), train_dataset=items[:24],
                      data_collator=collate or pad, callbacks=[callback])
    trainer.train()
    return tmp_path / "t.zarr", trainer


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_trainer_run_recorded_by_the_callback_passes_check(tmp_path, dtype, tol):
    """Trainer's AdamW (two param groups), warmup schedule, max-grad-norm clipping, gradient accumulation
    and dropout, all taken as the Trainer ran them."""
    path, trainer = _trainer(tmp_path, dtype)
    run = eq.open(path)
    assert run.n_steps == 6 and run.dropout_seed is not None
    lrs = run.step_var("lr")[:, 0]
    assert lrs[0] == 0 and abs(lrs[2] - 1e-2) < 1e-12  # linear warmup over 2 steps, then decay
    assert (run.step_var("clip") < 1).any()  # max_grad_norm=0.5 clipped some steps
    assert (run.step_var("batch_size") == 8).all()  # two micro-batches of 4 per step
    check = run.query("check on loss(test[*])")
    assert float(check["relative_residual"].abs().max()) < tol
    by_layer = run.query("influence on loss(test[*]) by layer")
    assert abs(float(by_layer["influence"].sum()) - float(check["actual"].sum())) < tol * max(
        1.0, float(check["actual"].abs().sum()))


def test_trainer_settings_that_cannot_be_exact_are_refused(tmp_path):
    with pytest.raises(RecordingError, match="label smoothing"):
        _trainer(tmp_path, label_smoothing_factor=0.1)


def test_trainer_batches_that_are_not_the_samplers_items_are_refused(tmp_path):
    """The callback checks each forward's inputs against the stored rows of the indices it tapped."""
    def shuffled(batch):  # a collator that reorders the items it is given
        from torch.utils.data import default_collate
        return {k: v for k, v in default_collate([{"input_ids": it["input_ids"][:5]} for it in batch[::-1]]).items()}
    with pytest.raises(RecordingError, match="not the train dataset's items"):
        _trainer(tmp_path, collate=lambda b: {**shuffled(b), "labels": shuffled(b)["input_ids"]})


def test_the_hf_example_trains_records_and_answers(tmp_path):
    """examples/hf in a reduced mode: the Trainer fine-tunes, the callback records, the README's queries run."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("hf_example", Path(__file__).parents[1] / "examples/hf/train.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert len(example.sentences()) == 64 and len({len(s) for s in example.sentences()}) == 2
    run = eq.open(example.train(tmp_path, steps=6))
    frames = {q: run.query(q) for q in example.QUERIES}
    assert float(frames["check on loss(test[*])"]["relative_residual"].abs().max()) < 1e-4
    top = frames["influence on loss(test[0]) by example top 5"]
    assert top["example"].head(5).null_count() == 0 and top.height == 5 + top["example"].null_count()
    # a float32 run: the rebuild's gap is its own term, beside the ranked examples
    assert "rounding" in top.filter(top["example"].is_null())["term"].to_list()
    # two micro-batches of 8 per step, but one at an epoch's end (56 sentences: 7 micro-batches)
    assert run.step_var("batch_size").tolist() == [16, 16, 16, 8, 16, 16]


def test_by_token_splits_a_sequences_loss_by_position(tmp_path, toy_run):
    """`by token`: each predicted position's share; a sequence's tokens sum to its loss's change, padding has
    no row, and a run without sequences refuses it naming the fix."""
    import polars as pl
    run = eq.open(record_gpt2(tmp_path / "g.zarr", hf_loss=False))
    check = run.query("check on loss(test[0..5])")
    per = run.query("influence on loss(test[0..5]) by test, token")
    sums = per.group_by("test").agg(pl.col("influence").sum()).sort("test")
    assert float((sums["influence"] - check["actual"]).abs().max()) < 1e-6 * float(check["actual"].abs().max())
    _, mask = sequences()
    for t in range(N_TEST):  # the tokens each item predicts: its unpadded positions after the first
        predicted = set(range(1, int(mask[N_TRAIN + t].sum())))
        assert set(per.filter(pl.col("test") == t)["token"]) == predicted
    logprob = run.query("influence on logprob(test[0..5]) by token")
    loss = run.query("influence on loss(test[0..5]) by token")
    assert float((logprob["influence"] + loss["influence"]).abs().max()) < 1e-12
    with pytest.raises(eq.ExplaindError, match="by token.*not token sequences.*loss='lm'"):
        eq.open(toy_run("mlp", "adamw", steps=4)).query("influence on loss(test[0]) by token")

"""Fine-tune a tiny GPT-2 with ``transformers.Trainer`` on generated sentences, recorded by the callback.

The task is made here, nothing is downloaded: sentences "the <colour> <animal> <verb> the <thing>" over
a 20-word vocabulary, where each animal has its own verb (cats sleep, dogs run, …), so a test sentence's
loss falls mostly through the training sentences about the same animal. The model is
``GPT2LMHeadModel`` from its config as it comes (dropout 0.1, SDPA attention, tied embeddings), trained by
the Trainer's AdamW with warmup, gradient clipping at 1.0 and gradient accumulation, in float32.

Run: ``python examples/hf/train.py [--out runs/hf] [--steps 40]``; then the queries in
``examples/hf/README.md``, or ``--queries`` to print them here.
"""

from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

import torch

COLOURS = ["red", "blue", "green", "grey"]
ANIMALS = {"cat": "sleeps", "dog": "runs", "bird": "sings", "fish": "swims"}
THINGS = ["mat", "park", "tree", "pond"]
WORDS = ["<pad>", "the", "in", *COLOURS, *ANIMALS, *ANIMALS.values(), *THINGS]
QUERIES = [
    "check on loss(test[*])",
    "influence on loss(test[0]) by example top 5",
    "influence on loss(test[*]) by layer",
    "influence on loss(test[*]) by step every 10",
    "influence on loss(test[0]) by token",
]


def sentences(seed: int = 0) -> list[list[int]]:
    """Every sentence of the grammar (64), shuffled; those about the pond are a word longer, so lengths vary."""
    out = []
    for colour, (animal, verb), thing in itertools.product(COLOURS, ANIMALS.items(), THINGS):
        words = ["the", colour, animal, verb] + (["the", thing] if thing != "pond" else ["in", "the", thing])
        out.append([WORDS.index(w) for w in words])
    random.Random(seed).shuffle(out)
    return out


def text(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest sentence (right padding); padding gets the ignored label -100."""
    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, it in enumerate(items):
        ids[i, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[i, : len(it["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(out: Path, steps: int = 40) -> Path:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from explaind_ql.hf import Callback
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    data = [{"input_ids": s} for s in sentences()]
    train_set, test_set = data[:56], data[56:]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_positions=8, n_embd=32, n_layer=2, n_head=2,
                                       pad_token_id=0))
    args = TrainingArguments(str(out / "trainer"), max_steps=steps, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=5, max_grad_norm=1.0,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=10 ** 6,
                             disable_tqdm=True, seed=0)
    store = out / "gpt2.zarr"
    Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate,
            callbacks=[Callback(store, test=test_set, overwrite=True, dropout_seed=0)]).train()
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/hf", type=Path)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--queries", action="store_true", help="print the README's queries on the recorded run")
    args = ap.parse_args()
    store = train(args.out, args.steps)
    print(f"recorded {store}")
    if args.queries:
        import explaind_ql as eq
        run = eq.open(store)
        data = sentences()
        for q in QUERIES:
            frame = run.query(q)
            print(f">>> {q}\n{frame}\n")
            if "example" in frame.columns or "token" in frame.columns:  # the sentences behind the numbers
                print(f"test[0]: {text(data[56])}")
            if "example" in frame.columns:
                for k, term, v in frame.select("example", "term", "influence").iter_rows():
                    print(f"  train[{k}] {v:+.3f}  {text(data[k])}" if k is not None else f"  ({term}) {v:+.3g}")
                print()


if __name__ == "__main__":
    main()

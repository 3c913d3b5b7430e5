"""Hugging Face support: models recorded as configs (:mod:`.architecture`) and the Trainer callback (:mod:`.callback`).

``explaind_ql.hf.Callback`` imports transformers on first use; the rest of explaind_ql never does.
"""


def __getattr__(name: str):
    if name == "Callback":
        from .callback import Callback
        return Callback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

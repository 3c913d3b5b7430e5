"""Hugging Face models recorded as data: the class name and ``config.to_dict()``, rebuilt with ``from_config``.

A store names an HF architecture, never code: the class must be one of transformers' own
``PreTrainedModel`` classes (defined under ``transformers.models``), and a config that maps to
remote code (``auto_map``) is refused, so rebuilding runs only the installed library's code.
transformers is imported only when an HF model is recorded or rebuilt (the ``hf`` extra).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import dropout
from ..errors import RecordingError, StoreError

KEY = "hf"  # the store attribute: {"class": "GPT2LMHeadModel", "config": {...}, "attn_implementation": "sdpa"}


def _is_hf(model: torch.nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def describe(model: torch.nn.Module) -> dict[str, Any] | None:
    """The attribute that rebuilds ``model``, or None when it is not one of transformers' own model classes."""
    cls = type(model)
    if not _is_hf(model) or not cls.__module__.startswith("transformers.models."):
        return None
    config = model.config.to_dict()
    if config.get("auto_map"):
        raise RecordingError(f"{cls.__name__}'s config maps to remote code (auto_map); such a model cannot be "
                             "rebuilt safely from a store: pass factory='module:callable' instead")
    return {"class": cls.__name__, "config": config,
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


QUERY_ATTENTION = "explaind_sdpa"


def _register() -> None:
    """HF's SDPA attention made transformable: torch's fused kernels written out (:class:`dropout.Attention`), and its
    mask built without the shortcut that branches on the mask's values (``if mask.all()``), which vmap cannot trace."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def attention(*args, **kwargs):
        with dropout.Attention():
            return sdpa_attention_forward(*args, **kwargs)

    def mask(*args, **kwargs):
        return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})
    AttentionInterface.register(QUERY_ATTENTION, attention)
    AttentionMaskInterface.register(QUERY_ATTENTION, mask)


def for_transforms(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with attention that torch.func can vmap and that computes what training's did: SDPA (HF's default)
    becomes :data:`QUERY_ATTENTION`; eager attention (which some models take in float32) stays as it was."""
    if _is_hf(model) and getattr(model.config, "_attn_implementation", "eager") not in ("eager", QUERY_ATTENTION):
        _register()
        model.set_attn_implementation(QUERY_ATTENTION)
    return model


def rebuild(spec: Any, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model ``spec`` (:func:`describe`) names, with fresh weights (the caller puts the recorded ones in)."""
    if not (isinstance(spec, dict) and isinstance(spec.get("class"), str) and isinstance(spec.get("config"), dict)):
        raise StoreError("the store's Hugging Face model description is damaged; re-record the run")
    try:
        import transformers
    except ImportError:
        raise StoreError(f"this run was recorded from a Hugging Face {spec['class']}; install transformers "
                         "(pip install \"explaind_ql[hf]\") or pass open(path, model=...)") from None
    cls = getattr(transformers, spec["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and cls.__module__.startswith("transformers.models.")):
        raise StoreError(f"the store names {spec['class']!r}, which is not a transformers model class; "
                         "re-record the run or pass open(path, model=...)")
    if spec["config"].get("auto_map"):
        raise StoreError(f"the store's {spec['class']} config maps to remote code (auto_map), which is never run; "
                         "pass open(path, model=...)")
    try:
        config = cls.config_class.from_dict(spec["config"])
        with torch.device(device):
            return cls._from_config(config, attn_implementation=spec.get("attn_implementation") or "sdpa")
    except Exception as exc:  # noqa: BLE001 - a config from another transformers version may fail anyhow
        raise StoreError(f"cannot rebuild the recorded {spec['class']} with transformers {transformers.__version__} "
                         f"({type(exc).__name__}: {exc}); pass open(path, model=...)") from None

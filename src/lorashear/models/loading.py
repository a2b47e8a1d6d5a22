"""Load a causal LM by hub id, local directory or built-in name.

Loading uses the real ``from_pretrained``; only the built-in name
:data:`~lorashear.models.reference.REFERENCE_MODEL_NAME` resolves to the
offline reference model.

Uniform models load with plain ``AutoModelForCausalLM.from_pretrained``.
Models whose layers differ (written by :func:`lorashear.compact` and
:func:`~lorashear.models.saving.save_pretrained`) carry transformers'
``per_layer_config`` in ``config.json`` (layer index -> width overrides);
transformers 5.23 parses and serialises that schema but does not yet build
layers from it, so :func:`load_pretrained` builds the model with the global
widths on the meta device, rebuilds each overridden decoder layer from its
layer config, and loads the safetensors weights into it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ModelNotFoundError, UnsupportedArchitectureError
from .reference import ensure_reference_model, is_reference_name

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def resolve_dtype(dtype: "str | torch.dtype | None") -> "torch.dtype":
    import torch

    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelNotFoundError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return getattr(torch, _DTYPES[key])


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """Map a user-supplied model name to something ``from_pretrained`` accepts.

    - the built-in reference name -> the converted local copy (converted on first use);
    - an existing local directory -> itself (it must contain ``config.json``);
    - anything else -> treated as a hub id.
    """
    text = os.fspath(name_or_path)
    if is_reference_name(text):
        return str(ensure_reference_model())
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{text} is a file; pass the model directory that holds config.json")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{text} has no config.json; pass a Hugging Face model directory")
        return str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelNotFoundError(f"model directory {text} does not exist")
    return text


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: "str | torch.dtype | None" = "float32",
    device: "str | torch.device | None" = None,
    *,
    attn_implementation: str | None = None,
) -> "PreTrainedModel":
    """Load a causal LM for pruning or evaluation.

    Args:
        name_or_path: a hub id (``meta-llama/Llama-3.1-8B``), a local directory, or
            ``"smollm2-135m-instruct"`` for the built-in offline reference model.
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16`` or a torch dtype).
        device: where to put the model (default: CPU).
        attn_implementation: forwarded to ``from_pretrained`` (default: the library's choice).

    Directories saved with per-layer sizes (``per_layer_config``) are rebuilt
    with those shapes.
    """
    resolved = resolve_model_path(name_or_path)
    check_causal_lm(resolved, name=os.fspath(name_or_path))
    model = load_pretrained(resolved, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation)
    _check_causal_config(model.config.to_dict(), os.fspath(name_or_path))
    if device is not None:
        model.to(device)
    model.eval()
    return model


#: files of which a local model directory needs at least one for its tokenizer to load
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> "PreTrainedTokenizerBase":
    """Load the tokenizer that belongs to ``name_or_path`` (same resolution rules as :func:`load_model`)."""
    from transformers import AutoTokenizer

    resolved = resolve_model_path(name_or_path)
    name = os.fspath(name_or_path)
    local = Path(resolved)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ModelNotFoundError(f"{name} has no tokenizer (no tokenizer.json or tokenizer_config.json); save the "
                                 "tokenizer of the model it came from into it (tokenizer.save_pretrained(DIR))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except OSError as exc:
        raise ModelNotFoundError(_hub_message(resolved, exc)) from exc
    except (ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"the tokenizer of {name} cannot be loaded ({first}); save a working tokenizer "
                                 "into the model directory") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer_fits(model: "torch.nn.Module", tokenizer: "PreTrainedTokenizerBase", name: str = "") -> None:
    """Refuse a tokenizer whose token ids do not all have a row in the model's input embedding."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        rows = int(base.get_input_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError):  # no standard input embedding: nothing to check
        return
    size = len(tokenizer)
    if size > rows:
        of = f" of {name}" if name else ""
        raise ConfigError(f"the tokenizer{of} has {size:,} tokens but the model's embedding has only {rows:,} rows; "
                          "use the tokenizer the model was trained with")


def _check_causal_config(config: dict[str, Any], name: str) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = str(config.get("model_type") or "")
    arch = ", ".join(config.get("architectures") or []) or model_type or "unknown"
    what = f"{name} is a {model_type or 'model'} model ({arch}), not a causal (decoder-only) language model"
    hint = "; lorashear prunes causal LMs such as Llama, Mistral, Qwen, Phi-3 and Gemma"
    if config.get("is_encoder_decoder"):
        raise UnsupportedArchitectureError(f"{name} is an encoder-decoder model ({arch}), not a causal (decoder-only) "
                                           f"language model{hint}")
    if model_type and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedArchitectureError(what + hint)
    # BERT-like encoders also have a *ForCausalLM/LMHead class, but only act causally with is_decoder
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder"):
        raise UnsupportedArchitectureError(what + " (a bidirectional encoder)" + hint)


def check_causal_lm(name_or_path: str | os.PathLike[str], *, name: str | None = None) -> None:
    """Refuse a local model directory that does not hold a causal LM (a BERT-like encoder, an
    encoder-decoder, ...), from its ``config.json`` alone (no weights are read). Hub ids are checked
    by :func:`load_model` once loaded."""
    text = os.fspath(name_or_path)
    resolved = Path(resolve_model_path(text))
    if resolved.is_dir():
        _check_causal_config(_read_config_dict(resolved), name or text)


def _hub_message(name: str, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"could not load model {name!r}: not a local directory, not a built-in name, and the hub "
        f"could not provide it ({first}). Pass a local directory or 'smollm2-135m-instruct'."
    )


def _read_config_dict(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read {path / 'config.json'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{path / 'config.json'} does not hold a model config (a JSON object)")
    return data


def load_pretrained(path: str | os.PathLike[str], *, dtype: "torch.dtype | None" = None,
                    attn_implementation: str | None = None) -> "PreTrainedModel":
    """Load a causal LM saved by :func:`~lorashear.models.saving.save_pretrained` or any Hugging Face
    directory / hub id, with parameters in ``dtype`` (default float32).

    Heterogeneous models (``per_layer_config`` in config.json) are rebuilt with
    their per-layer shapes; everything else goes through ``from_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    local = Path(os.fspath(path))
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if local.is_dir() and _read_config_dict(local).get("per_layer_config"):
        return _load_heterogeneous(local, dtype=dtype, attn_implementation=attn_implementation)
    try:
        return AutoModelForCausalLM.from_pretrained(os.fspath(path), **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(_hub_message(os.fspath(path), exc)) from exc
    except ValueError as exc:  # "Unrecognized configuration class ... for this kind of AutoModel"
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise UnsupportedArchitectureError(f"{os.fspath(path)} is not a causal language model "
                                           f"(AutoModelForCausalLM cannot load it)") from exc


def _load_heterogeneous(path: Path, *, dtype: torch.dtype, attn_implementation: str | None) -> "PreTrainedModel":
    import copy

    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import adapter_for

    config = AutoConfig.from_pretrained(path)
    if attn_implementation:
        config._attn_implementation = attn_implementation  # noqa: SLF001 - the documented override slot
    global_config = copy.deepcopy(config)
    global_config.per_layer_config = None
    # parameters on meta (no memory, no random init); buffers such as RoPE tables are real
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(global_config, dtype=dtype)
    # the attention implementation is resolved while building the model; the per-layer configs inherit it
    config._attn_implementation = global_config._attn_implementation  # noqa: SLF001
    adapter = adapter_for(config)
    _, layers = adapter.decoder_layers(model)
    for idx in range(len(layers)):
        layer_config = config.per_layer_config[idx]
        with init_empty_weights(include_buffers=False):
            layers[idx] = type(layers[idx])(layer_config, idx)
        layers[idx].to(dtype)
    model.config = config
    for module in model.modules():
        if module is not model and hasattr(module, "config") and module.config is global_config:
            module.config = config
    state: dict[str, torch.Tensor] = {}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelNotFoundError(f"{path} has no .safetensors weights")
    for shard in shards:
        state.update(load_file(str(shard)))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise ModelNotFoundError(
            f"{path}: weights do not match the per-layer config (missing {still_meta[:3]}, unexpected {unexpected[:3]})")
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            raise ModelNotFoundError(f"{path}: buffer {name} was not initialised")
    model.eval()
    return model

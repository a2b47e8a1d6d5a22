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

from ..errors import ConfigError, LorashearError, ModelNotFoundError, UnsupportedArchitectureError
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
    rows = _embedding_rows(model)
    if rows is None:  # no standard input embedding: nothing to check
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
    """Refuse a local model directory that does not hold a loadable causal LM, before any weight is read:
    a config that is not a causal LM's (a BERT-like encoder, an encoder-decoder, ...) and files that
    cannot make the model it describes (:func:`check_model_files`). Hub ids are checked by
    :func:`load_model` once loaded."""
    text = os.fspath(name_or_path)
    resolved = Path(resolve_model_path(text))
    if resolved.is_dir():
        _check_causal_config(_read_config_dict(resolved), name or text)
        check_model_files(resolved, name=name or text)


#: weight files lorashear never reads: unpickling one can run any code
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
#: tensors a checkpoint may hold that are no parameters (older Llama saves carry their RoPE table)
_IGNORED_TENSOR_SUFFIXES = (".inv_freq",)
#: directories already checked (by path and file sizes and times) -> rows of their input embedding
_checked: dict[tuple[Any, ...], int | None] = {}


def _signature(path: Path) -> tuple[Any, ...]:
    files = sorted(p for p in path.iterdir() if p.is_file())
    return (str(path.resolve()), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def check_model_files(path: str | os.PathLike[str], *, name: str | None = None) -> int | None:
    """Refuse a local model directory whose files cannot make the model its ``config.json`` describes,
    with one line, reading no weights (only the safetensors headers and a model built on ``meta``):
    a config without ``model_type`` or that transformers cannot build, weights stored only as a pickle
    (never loaded), a missing, truncated or damaged safetensors file, and tensors whose names or shapes
    do not match the config's. A directory checked once is not checked again while its files are
    unchanged. Returns the rows of the model's input embedding (``None`` when it has no standard one)."""
    path = Path(os.fspath(path))
    name = name or str(path)
    key = _signature(path)
    if key in _checked:
        return _checked[key]
    config = _read_config_dict(path)
    if not config.get("model_type"):
        raise ModelNotFoundError(f"{path / 'config.json'} names no model_type, so it does not describe a model; "
                                 "use the config.json saved with the weights (model.save_pretrained)")
    shapes = safetensors_shapes(path, name)
    meta = build_meta_model(path, name=name)
    _compare_weights(meta, shapes, name)
    _checked[key] = _embedding_rows(meta)
    return _checked[key]


def _embedding_rows(model: "torch.nn.Module") -> int | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return int(base.get_input_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError):  # no standard input embedding
        return None


def check_same_vocabulary(model: str | os.PathLike[str], teacher: str | os.PathLike[str]) -> None:
    """Refuse a teacher whose embedding does not have the model's rows: their next-token distributions
    are compared token by token, so the teacher must share the model's vocabulary (local directories,
    read from the files alone; hub ids are not checked here)."""
    rows = {}
    for role, name in (("model", model), ("teacher", teacher)):
        resolved = Path(resolve_model_path(name))
        rows[role] = check_model_files(resolved, name=os.fspath(name)) if resolved.is_dir() else None
    if None not in rows.values() and rows["model"] != rows["teacher"]:
        raise ConfigError(f"the teacher {os.fspath(teacher)} has {rows['teacher']:,} token embeddings and the model "
                          f"{os.fspath(model)} {rows['model']:,}: its next-token distributions cannot be compared "
                          "with the model's; give the dense model the pruned one came from")


def _weight_shards(path: Path, name: str) -> list[Path]:
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
        if pickles:
            raise ModelNotFoundError(f"{name} holds its weights only as a pickle ({pickles[0]}), which lorashear "
                                     "never loads (unpickling can run code); convert them to safetensors "
                                     "(model.save_pretrained(DIR) in a trusted environment)")
        raise ModelNotFoundError(f"{name} has no weights (no .safetensors file); save the model into it")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelNotFoundError(f"{index} is damaged ({type(exc).__name__}); save the model again") from exc
        absent = sorted(f for f in listed if not (path / f).is_file())
        if absent:
            raise ModelNotFoundError(f"{name} lacks the weight shard {absent[0]} its index lists; copy the whole model")
    return shards


def _header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, refused with one line when the file is cut or damaged."""
    size = file.stat().st_size
    damaged = f"{file} is truncated or damaged"
    with open(file, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > size - 8:
            raise ModelNotFoundError(f"{damaged} ({size:,} bytes, no readable header); copy or save the model again")
        try:
            header = json.loads(fh.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ModelNotFoundError(f"{damaged} (unreadable header); copy or save the model again") from exc
    if 8 + length + end != size:
        raise ModelNotFoundError(f"{damaged} ({size:,} bytes where its header describes {8 + length + end:,}); "
                                 "copy or save the model again")
    return header


def safetensors_shapes(path: str | os.PathLike[str], name: str | None = None) -> dict[str, tuple[int, ...]]:
    """``tensor name -> shape`` over every safetensors file of a model directory, from the headers alone."""
    path = Path(os.fspath(path))
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in _weight_shards(path, name or str(path)):
        header = _header(shard)
        shapes.update({k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def build_meta_model(path: str | os.PathLike[str], *, name: str | None = None) -> "PreTrainedModel":
    """The model ``path/config.json`` describes, built on the ``meta`` device (no memory, no weights read);
    per-layer configs included. A config transformers cannot build is refused with one line."""
    from transformers import AutoConfig

    path = Path(os.fspath(path))
    name = name or str(path)
    try:
        model = _skeleton(AutoConfig.from_pretrained(path), dtype=None, attn_implementation=None)
        model.tie_weights()  # tied output embeddings are one tensor, stored once
        return model
    except LorashearError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"{name}: config.json does not describe a model transformers can build ({first}); "
                                 "use the config.json saved with the weights") from exc


def _compare_weights(model: "PreTrainedModel", shapes: dict[str, tuple[int, ...]], name: str) -> None:
    """Refuse weights whose tensor names or shapes are not those of ``model`` (built from the config)."""
    prefix = f"{getattr(model, 'base_model_prefix', '') or 'model'}."
    aliases: dict[int, list[str]] = {}
    expected: dict[str, tuple[int, ...]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
        expected[n] = tuple(p.shape)
    buffers = {n for n, _ in model.named_buffers()}

    def stored(n: str) -> str | None:
        return next((k for k in (n, n.removeprefix(prefix)) if k in shapes), None)

    problem = None
    for n, shape in expected.items():
        k = stored(n)
        if k is not None and shapes[k] != shape:
            problem = f"{k} is {list(shapes[k])} in the weights but {list(shape)} by the config"
            break
    if problem is None:
        missing = [names[0] for names in aliases.values() if all(stored(n) is None for n in names)]
        if missing:
            problem = f"{len(missing)} tensor(s) the config needs are not in the weights ({missing[0]}, ...)"
    if problem is None:
        known = set(expected) | {n.removeprefix(prefix) for n in expected} | buffers
        extra = [k for k in shapes if k not in known and not k.endswith(_IGNORED_TENSOR_SUFFIXES)]
        if extra:
            problem = f"{len(extra)} tensor(s) of the weights have no place in the model the config describes ({extra[0]}, ...)"
    if problem is not None:
        raise ModelNotFoundError(f"{name}: the weights do not match config.json: {problem}; use the config.json "
                                 "saved with these weights")


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
    directory / hub id, with parameters in ``dtype`` (default float32). Only safetensors weights are
    read (never a pickle); a local directory is checked first (:func:`check_model_files`).

    Heterogeneous models (``per_layer_config`` in config.json) are rebuilt with
    their per-layer shapes; everything else goes through ``from_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    local = Path(os.fspath(path))
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if local.is_dir():
        check_model_files(local)
        if _read_config_dict(local).get("per_layer_config"):
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


def _skeleton(config: Any, *, dtype: "torch.dtype | None", attn_implementation: str | None) -> "PreTrainedModel":
    """The model ``config`` describes with its parameters on ``meta`` (buffers such as RoPE tables are real);
    a ``per_layer_config`` rebuilds each overridden decoder layer from its layer config."""
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .adapters import adapter_for

    kwargs = {} if dtype is None else {"dtype": dtype}
    if not getattr(config, "per_layer_config", None):
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, **kwargs)
    if attn_implementation:
        config._attn_implementation = attn_implementation  # noqa: SLF001 - the documented override slot
    global_config = copy.deepcopy(config)
    global_config.per_layer_config = None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(global_config, **kwargs)
    # the attention implementation is resolved while building the model; the per-layer configs inherit it
    config._attn_implementation = global_config._attn_implementation  # noqa: SLF001
    _, layers = adapter_for(config).decoder_layers(model)
    for idx in range(len(layers)):
        with init_empty_weights(include_buffers=False):
            layers[idx] = type(layers[idx])(config.per_layer_config[idx], idx)
        if dtype is not None:
            layers[idx].to(dtype)
    model.config = config
    for module in model.modules():
        if module is not model and hasattr(module, "config") and module.config is global_config:
            module.config = config
    return model


def _load_heterogeneous(path: Path, *, dtype: torch.dtype, attn_implementation: str | None) -> "PreTrainedModel":
    from safetensors.torch import load_file
    from transformers import AutoConfig

    model = _skeleton(AutoConfig.from_pretrained(path), dtype=dtype, attn_implementation=attn_implementation)
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

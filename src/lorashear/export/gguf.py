"""GGUF export for llama.cpp: uniform models as ``llama``, non-uniform ones as ``deci``.

A LoRAShear model may keep different widths in every decoder layer. llama.cpp reads
per-layer ``head_count``, ``head_count_kv`` and ``feed_forward_length`` arrays for every
architecture, but only its ``deci`` architecture (Nemotron-NAS / DeciLM) builds layers from
them; its ``llama`` architecture sizes every layer from layer 0 and refuses the file. So:

- every layer alike -> ``general.architecture = llama`` with plain integers;
- layers differ     -> ``deci`` with one value per layer.

What ``deci`` computes (llama.cpp ``src/models/deci.cpp``) and what this module does about it:

- a layer whose FFN width is 0 is skipped *entirely* (``continue`` before the residual), so a
  layer that keeps attention but lost its whole MLP would silently lose its attention output.
  Such a layer is written with the smallest FFN that llama.cpp computes right, one channel with
  all-zero weights (``silu(0) * 0`` projected by a zero column adds exactly nothing), and the
  result says so; ``empty_ffn="refuse"`` stops instead;
- ``head_dim`` and the hidden size must be the same in every layer (compaction keeps both);
- quantised types need row widths divisible by the block size (32 for Q8_0). A tensor whose
  row width (its input features: ``ffn_down`` after MLP pruning, ``attn_output`` after head
  pruning) does not divide is written as F16, and :attr:`GGUFExport.fallbacks` lists it.

Tensors use llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ... ``output``) and the Q/K row
permutation of llama.cpp's ``convert_hf_to_gguf.py`` (Hugging Face's rotate-half RoPE pairs
dimension ``i`` with ``i + d/2``; llama.cpp's ``llama``/``deci`` RoPE pairs ``2i`` with ``2i+1``),
applied per layer with that layer's own head counts. The tokenizer is embedded (GPT-2 style
byte-level BPE: tokens, types, merges, special ids, chat template and the pre-tokenizer name
llama.cpp knows it by), so the file runs on its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, UnsupportedArchitectureError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: ``--outtype`` values: float32, float16, or Q8_0 (1-D tensors such as norms stay float32)
OUTTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
#: what to do with a layer that keeps attention but has no FFN channel left
EMPTY_FFN_POLICIES: tuple[str, ...] = ("pad", "refuse")
#: Hugging Face model types written with llama.cpp's llama/deci graph (RMSNorm, SwiGLU, RoPE, GQA)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral")
#: rows of a Q8_0 block
Q8_0_BLOCK = 32

# llama.cpp names a BPE pre-tokenizer by the SHA-256 of the token ids its reference text encodes
# to (convert_hf_to_gguf.py, get_vocab_base_pre). The text and the hashes are that script's.
_PRE_TOKENIZER_CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f '
    '(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 '
    '3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785'
    '\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= '
    '\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 '
    '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? '
    '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer becomes in the GGUF file."""

    n_head: int       #: query heads
    n_head_kv: int    #: key/value heads
    n_ff: int         #: FFN width as written (1 for a padded empty FFN)
    padded_ffn: bool  #: the model's FFN width was 0; a zero FFN of width 1 stands in


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: str
    arch: str                          #: ``llama`` (uniform) or ``deci`` (per-layer widths)
    outtype: str
    num_layers: int
    hidden_size: int
    head_dim: int
    vocab_size: int
    head_count: list[int]              #: per layer (as written)
    head_count_kv: list[int]           #: per layer
    feed_forward_length: list[int]     #: per layer (a padded empty FFN counts 1)
    tokenizer_pre: str                 #: ``tokenizer.ggml.pre``
    tensors: list[dict[str, Any]]      #: name, shape (ggml order: row width first), type
    fallbacks: list[dict[str, Any]]    #: tensors written as F16 instead of the quantised type, and why
    padded_ffn_layers: list[int]       #: layers whose empty FFN was written as one zero channel
    notes: list[str] = field(default_factory=list)
    file_bytes: int = 0

    @property
    def uniform(self) -> bool:
        return self.arch == "llama"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ helpers
def permute_rotary(weight: "np.ndarray", n_heads: int) -> "np.ndarray":
    """Reorder the rows of a Q or K projection (``n_heads * head_dim`` rows) from Hugging Face's
    rotate-half RoPE layout to llama.cpp's interleaved one (convert_hf_to_gguf.py's ``permute``).

    Per head, row ``j`` of the first half and row ``j`` of the second half become rows ``2j`` and
    ``2j + 1``. ``n_heads`` is the number of heads in *these* rows (a layer's KV heads for K).
    """
    rows = weight.shape[0]
    if n_heads <= 0 or rows % (2 * n_heads):
        raise ValueError(f"cannot permute {rows} rows as {n_heads} rotary heads")
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def detect_pre_tokenizer(tokenizer: "PreTrainedTokenizerBase") -> str | None:
    """llama.cpp's name for ``tokenizer``'s pre-tokenizer (``tokenizer.ggml.pre``), or None if unknown."""
    ids = tokenizer.encode(_PRE_TOKENIZER_CHECK_TEXT)
    return KNOWN_PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest())


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - the extra is installed by scripts/setup.sh
        raise ConfigError("GGUF export needs the 'gguf' package: pip install 'lorashear[gguf]'") from exc
    return gguf


def _rope(config: Any) -> tuple[float, str, float | None]:
    """``(theta, type, linear factor)`` from a transformers 5 (``rope_parameters``) or 4 config."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = params.get("factor", scaling.get("factor"))
    return float(theta), str(rope_type), (float(factor) if factor is not None else None)


def _check_config(config: Any) -> None:
    model_type = str(getattr(config, "model_type", "unknown"))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"GGUF export supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; this model is '{model_type}'")
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        raise UnsupportedArchitectureError("GGUF export: Mistral with a sliding window is not supported "
                                           "(llama.cpp's llama/deci graph attends to the whole context)")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"GGUF export: hidden_act '{act}' is not supported (llama.cpp's "
                                           "llama/deci FFN is SwiGLU with silu)")
    for key in ("attention_bias", "mlp_bias"):
        if getattr(config, key, False):
            raise UnsupportedArchitectureError(f"GGUF export: models with {key}=true are not supported yet")
    _, rope_type, _ = _rope(config)
    if rope_type not in ("default", "linear"):
        raise UnsupportedArchitectureError(
            f"GGUF export: RoPE type '{rope_type}' is not supported yet (default and linear are)")


def _walk_types(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for value in node.values():
            found |= _walk_types(value)
    elif isinstance(node, list):
        for value in node:
            found |= _walk_types(value)
    return found


# ------------------------------------------------------------------------------------ the model
def _to_numpy(t: "torch.Tensor") -> "np.ndarray":
    return t.detach().to("cpu").float().numpy()


def plan_layers(model: "torch.nn.Module", *, empty_ffn: str = "pad") -> tuple[int, list[LayerPlan], list[str]]:
    """``(head_dim, one LayerPlan per decoder layer, notes)`` read from the weights' shapes.

    Raises :class:`~lorashear.errors.ConfigError` for a layer llama.cpp cannot compute right and
    ``empty_ffn="refuse"``.
    """
    from ..models.adapters import adapter_for

    adapter = adapter_for(model)
    head_dim = adapter.head_dim
    if head_dim % 2:
        raise UnsupportedArchitectureError(f"GGUF export: head_dim {head_dim} is odd; RoPE needs an even one")
    _, layers = adapter.decoder_layers(model)
    plans: list[LayerPlan] = []
    notes: list[str] = []
    for idx, layer in enumerate(layers):
        attn, mlp = adapter.attention_module(layer), adapter.mlp_module(layer)
        q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
        o = attn.o_proj.weight
        if q.shape[0] % head_dim or k.shape[0] % head_dim or k.shape != v.shape or o.shape[1] != q.shape[0]:
            raise UnsupportedArchitectureError(
                f"layer {idx}: q/k/v/o shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)}/{tuple(o.shape)} "
                f"do not split into heads of width {head_dim}")
        n_head, n_head_kv = q.shape[0] // head_dim, k.shape[0] // head_dim
        if n_head == 0 or n_head_kv == 0 or n_head % n_head_kv:
            raise UnsupportedArchitectureError(
                f"layer {idx}: {n_head} query heads over {n_head_kv} KV heads cannot be written for llama.cpp")
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        n_ff = gate.shape[0]
        if up.shape[0] != n_ff or down.shape[1] != n_ff:
            raise UnsupportedArchitectureError(f"layer {idx}: gate/up/down widths {gate.shape[0]}/{up.shape[0]}/"
                                               f"{down.shape[1]} differ")
        padded = False
        if n_ff == 0:
            if empty_ffn == "refuse":
                raise ConfigError(
                    f"layer {idx} keeps {n_head} attention heads but has no FFN channel left; llama.cpp's deci "
                    "architecture skips such a layer whole and would drop its attention output without an error. "
                    "Export with --empty-ffn pad (a zero FFN of width 1, exact) or keep an MLP channel in that layer")
            n_ff, padded = 1, True
            notes.append(f"layer {idx}: FFN width 0 with attention kept; written as a zero FFN of width 1 "
                         "(llama.cpp would drop the attention output of a layer without FFN)")
        plans.append(LayerPlan(n_head, n_head_kv, n_ff, padded))
    return head_dim, plans, notes


def _layer_tensors(adapter: Any, layer: Any, plan: LayerPlan, head_dim: int, hidden: int) -> list[tuple[str, Any]]:
    import numpy as np

    attn, mlp = adapter.attention_module(layer), adapter.mlp_module(layer)
    out = [
        ("attn_norm.weight", _to_numpy(layer.input_layernorm.weight)),
        ("attn_q.weight", permute_rotary(_to_numpy(attn.q_proj.weight), plan.n_head)),
        ("attn_k.weight", permute_rotary(_to_numpy(attn.k_proj.weight), plan.n_head_kv)),
        ("attn_v.weight", _to_numpy(attn.v_proj.weight)),
        ("attn_output.weight", _to_numpy(attn.o_proj.weight)),
        ("ffn_norm.weight", _to_numpy(layer.post_attention_layernorm.weight)),
    ]
    if plan.padded_ffn:
        zeros_in = np.zeros((plan.n_ff, hidden), dtype=np.float32)
        out += [("ffn_gate.weight", zeros_in), ("ffn_up.weight", zeros_in.copy()),
                ("ffn_down.weight", np.zeros((hidden, plan.n_ff), dtype=np.float32))]
    else:
        out += [("ffn_gate.weight", _to_numpy(mlp.gate_proj.weight)),
                ("ffn_up.weight", _to_numpy(mlp.up_proj.weight)),
                ("ffn_down.weight", _to_numpy(mlp.down_proj.weight))]
    return out


def _tied(model: Any) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        return True
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        return True
    return False


# ------------------------------------------------------------------------------------ tokenizer
def _tokenizer_dir(source_dir: Path | None, tokenizer: Any, model: Any, stack: contextlib.ExitStack) -> Path:
    """A directory holding ``tokenizer.json`` (+ config files) for gguf's SpecialVocab."""
    if source_dir is not None and (source_dir / "tokenizer.json").is_file():
        return source_dir
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lorashear-gguf-tok-")))
    tokenizer.save_pretrained(tmp)
    if not (tmp / "config.json").exists():
        model.config.to_json_file(tmp / "config.json")
    if not (tmp / "tokenizer.json").is_file():
        raise ConfigError("GGUF export needs a fast tokenizer with a tokenizer.json (byte-level BPE); "
                          f"{type(tokenizer).__name__} has none")
    return tmp


def _vocab(tokenizer: Any, vocab_size: int, gguf: Any) -> tuple[list[str], list[int]]:
    """Tokens and token types as llama.cpp's converter writes them for GPT-2 style vocabularies."""
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ConfigError(f"the tokenizer has token ids up to {max(vocab.values())} but the model's embedding "
                          f"has only {vocab_size} rows; export with the tokenizer the model was trained with")
    reverse = {i: tok for tok, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif tok in added:
            special = bool(getattr(decoder.get(i), "special", False))
            if special or (tok.startswith("<|") and tok.endswith("|>")):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                tok = tok.replace("\u2581", " ")
                types.append(int(gguf.TokenType.USER_DEFINED))
            tokens.append(tok)
        else:
            tokens.append(tok)
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def _check_byte_level_bpe(tok_dir: Path) -> None:
    try:
        data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {tok_dir / 'tokenizer.json'}: {exc}") from exc
    model_type = (data.get("model") or {}).get("type")
    if model_type != "BPE" or "ByteLevel" not in _walk_types(data.get("pre_tokenizer")):
        raise ConfigError(
            f"GGUF export writes GPT-2 style byte-level BPE tokenizers; this tokenizer is {model_type} with "
            f"pre-tokenizer {sorted(_walk_types(data.get('pre_tokenizer'))) or 'none'}")


def check_exportable(model: "str | os.PathLike[str]") -> None:
    """Refuse a model directory the export cannot write, from its ``config.json`` and ``tokenizer.json``
    alone (no weights are read): an unsupported architecture, activation, bias or RoPE type, and a
    tokenizer that is not byte-level BPE. Hub ids are checked when the export loads them."""
    from transformers import AutoConfig

    from ..models.loading import resolve_model_path

    resolved = Path(resolve_model_path(model))
    if not resolved.is_dir():
        return
    _check_config(AutoConfig.from_pretrained(resolved))
    if (resolved / "tokenizer.json").is_file():
        _check_byte_level_bpe(resolved)


# ------------------------------------------------------------------------------------ writing
def _tensor_type(name: str, array: "np.ndarray", outtype: str, gguf: Any) -> tuple[Any, str | None]:
    """``(GGML type, fallback reason or None)`` for one tensor."""
    T = gguf.GGMLQuantizationType
    if array.ndim == 1 or outtype == "f32":
        return T.F32, None
    if outtype == "f16":
        return T.F16, None
    width = array.shape[-1]
    if width % Q8_0_BLOCK:
        return T.F16, f"row width {width} is not a multiple of {Q8_0_BLOCK} (Q8_0 block)"
    return T.Q8_0, None


def export_gguf(
    model: "str | os.PathLike[str] | torch.nn.Module",
    out: str | os.PathLike[str],
    *,
    tokenizer: "PreTrainedTokenizerBase | None" = None,
    outtype: str = "f16",
    empty_ffn: str = "pad",
    tokenizer_pre: str | None = None,
    name: str | None = None,
    arch: str | None = None,
) -> GGUFExport:
    """Write ``model`` as one self-contained GGUF file that llama.cpp runs.

    Args:
        model: a model directory saved by lorashear (uniform or with ``per_layer_config``), any
            name :func:`~lorashear.models.loading.load_model` accepts, or a loaded model
            (a peft model is merged in place first, as :func:`~lorashear.save_pretrained` does).
        out: the ``.gguf`` file to write (atomically; its directory is created).
        tokenizer: the tokenizer to embed; default: the one saved with ``model``.
        outtype: ``f32``, ``f16`` (default) or ``q8_0``; 1-D tensors stay float32. With ``q8_0``
            tensors whose row width is not a multiple of 32 are written as F16 (listed in
            :attr:`GGUFExport.fallbacks`).
        empty_ffn: ``pad`` (default) writes a layer that keeps attention but lost its whole MLP
            with one all-zero FFN channel (exact); ``refuse`` raises instead.
        tokenizer_pre: llama.cpp's pre-tokenizer name; default: recognised from the tokenizer,
            else ``default`` (with a note).
        name: ``general.name``; default: the directory name or the config's ``_name_or_path``.
        arch: ``None`` (default) picks ``llama`` for a uniform model and ``deci`` otherwise; ``deci``
            writes even a uniform model as ``deci`` (per-layer arrays; to compare the two graphs);
            ``llama`` refuses a model whose layers differ.
    """
    if outtype not in OUTTYPES:
        raise ConfigError(f"unknown GGUF outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    if empty_ffn not in EMPTY_FFN_POLICIES:
        raise ConfigError(f"unknown empty_ffn policy {empty_ffn!r}; use one of {', '.join(EMPTY_FFN_POLICIES)}")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; name the .gguf file to write")
    if arch not in (None, "llama", "deci"):
        raise ConfigError(f"unknown GGUF architecture {arch!r}; use llama, deci or leave it unset")
    gguf = _import_gguf()
    import numpy as np
    import torch

    source_dir: Path | None = None
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ConfigError("export_gguf(model object, ...) needs tokenizer=...; the GGUF file embeds it")
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    else:
        from ..models.loading import load_model, load_tokenizer, resolve_model_path

        resolved = resolve_model_path(model)
        if Path(resolved).is_dir():
            source_dir = Path(resolved)
        name = name or (source_dir.name if source_dir else str(model))
        loaded = load_model(resolved, dtype="float32")
        if tokenizer is None:
            tokenizer = load_tokenizer(resolved)
        else:
            source_dir = None  # the tokenizer given wins over the files saved with the model
        model = loaded
    config = model.config
    _check_config(config)

    from ..models.adapters import adapter_for

    adapter = adapter_for(model)
    head_dim, plans, notes = plan_layers(model, empty_ffn=empty_ffn)
    uniform = len({(p.n_head, p.n_head_kv, p.n_ff) for p in plans}) == 1
    if arch == "llama" and not uniform:
        raise ConfigError("its layers differ in width, which llama.cpp's llama architecture cannot build; "
                          "leave arch unset (deci is chosen)")
    arch = arch or ("llama" if uniform else "deci")
    embed = model.get_input_embeddings().weight
    vocab_size, hidden = int(embed.shape[0]), int(embed.shape[1])
    theta, rope_type, rope_factor = _rope(config)

    with contextlib.ExitStack() as stack:
        tok_dir = _tokenizer_dir(source_dir, tokenizer, model, stack)
        _check_byte_level_bpe(tok_dir)
        tokens, toktypes = _vocab(tokenizer, vocab_size, gguf)
        pre = tokenizer_pre or detect_pre_tokenizer(tokenizer)
        if pre is None:
            pre = "default"
            notes.append("the tokenizer's pre-tokenizer is not one llama.cpp's converter recognises; wrote "
                         "tokenizer.ggml.pre=default (pass tokenizer_pre / --tokenizer-pre to name it)")
        special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise ConfigError(f"{tok_dir / 'tokenizer.json'} has no BPE merges; llama.cpp cannot tokenize without them")

        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        stack.callback(lambda: tmp.unlink(missing_ok=True))
        writer = gguf.GGUFWriter(tmp, arch)
        if name is None:
            name = str(getattr(config, "_name_or_path", "") or "lorashear-model")
        writer.add_name(Path(name).name or name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        writer.add_block_count(len(plans))
        if arch == "llama":  # one value for every layer; deci takes one per layer
            writer.add_feed_forward_length(plans[0].n_ff)
            writer.add_head_count(plans[0].n_head)
            writer.add_head_count_kv(plans[0].n_head_kv)
        else:
            writer.add_feed_forward_length([p.n_ff for p in plans])
            writer.add_head_count([p.n_head for p in plans])
            writer.add_head_count_kv([p.n_head_kv for p in plans])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        if rope_type == "linear" and rope_factor:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope_factor)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(vocab_size)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(toktypes)
        special.add_to_gguf(writer, quiet=True)

        records: list[dict[str, Any]] = []
        fallbacks: list[dict[str, Any]] = []

        def add(tensor_name: str, array: "np.ndarray") -> None:
            array = np.ascontiguousarray(array, dtype=np.float32)
            qtype, reason = _tensor_type(tensor_name, array, outtype, gguf)
            if reason is not None:
                fallbacks.append({"name": tensor_name, "shape": [int(s) for s in reversed(array.shape)],
                                  "wanted": outtype.upper(), "written": qtype.name, "reason": reason})
            data = gguf.quants.quantize(array, qtype)
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor(tensor_name, data)
            else:
                writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            records.append({"name": tensor_name, "shape": [int(s) for s in reversed(array.shape)],
                            "type": qtype.name})

        with torch.no_grad():
            add("token_embd.weight", _to_numpy(embed))
            _, layers = adapter.decoder_layers(model)
            for idx, (layer, plan) in enumerate(zip(layers, plans)):
                for suffix, array in _layer_tensors(adapter, layer, plan, head_dim, hidden):
                    add(f"blk.{idx}.{suffix}", array)
            add("output_norm.weight", _to_numpy(model.model.norm.weight))
            if not _tied(model):
                add("output.weight", _to_numpy(model.get_output_embeddings().weight))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, out)

    if fallbacks:
        logger.warning("%d tensor(s) written as F16 instead of %s: %s", len(fallbacks), outtype.upper(),
                       ", ".join(f["name"] for f in fallbacks))
    for note in notes:
        logger.warning("%s", note)
    return GGUFExport(
        path=str(out), arch=arch, outtype=outtype, num_layers=len(plans), hidden_size=hidden, head_dim=head_dim,
        vocab_size=vocab_size, head_count=[p.n_head for p in plans], head_count_kv=[p.n_head_kv for p in plans],
        feed_forward_length=[p.n_ff for p in plans], tokenizer_pre=pre, tensors=records, fallbacks=fallbacks,
        padded_ffn_layers=[i for i, p in enumerate(plans) if p.padded_ffn], notes=notes,
        file_bytes=out.stat().st_size)

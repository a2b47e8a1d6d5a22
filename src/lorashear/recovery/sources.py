"""The data sources of dynamic knowledge recovery: one data spec each, cleaned, split, packed.

A source is any ``--data`` spec (a local file or folder, ``hf:NAME``, ``builtin:NAME``).
Each one becomes a :class:`Source`: packed training sequences and a held-out validation
set that is never trained on, both ``(N, seq_len)`` token ids.

Split (by document, deterministic; a document is on one side only):

- ``builtin:`` sources and aliases: the corpus's own split (``train`` is trained on, the same
  sources' ``validation`` is held out; ``builtin:heldout`` and ``builtin:heldout-docs`` read
  exactly those held-out documents, so evaluating on them afterwards stays honest);
- local files and folders named without ``split=``: the data layer's split (``SPEC:split=train``
  is trained on, ``SPEC:split=validation`` held out, 10 % of the documents);
- everything else (``hf:`` names, specs that fix a split): the spec's texts split by the SHA-256
  of their index, 10 % held out (:func:`lorashear.data.splits.split_documents`).

Cleaning, as in the paper: irregular characters dropped (:func:`clean_text`) and, for text
sources, paragraphs shorter than ``min_paragraph_tokens`` tokens dropped (:func:`keep_long_paragraphs`).

Instruction sources (Alpaca-style records ``instruction`` / optional ``input`` / ``output``, or
chat ``messages``) are rendered with the plain template of :mod:`lorashear.data.instructions`::

    ### Instruction:
    {prompt}

    ### Response:
    {response}<eos>

and only the response tokens (and the EOS after the last one) are trained on: prompt tokens are
stored as ``~id`` (:func:`lorashear.training.losses.mask_prompt`), which
:func:`~lorashear.training.losses.masked_lm_loss` feeds to the model but never predicts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..errors import ConfigError, DataError
from ..training.losses import mask_prompt, next_token_losses, split_prompt_mask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Kind = Literal["text", "instruction"]
_PARAGRAPH = re.compile(r"\n\s*\n")
#: characters kept although unicodedata calls them control or format characters
_KEEP = frozenset("\n\t")
#: unicode categories dropped as irregular: control, format (zero-width, BOM), surrogate, private use, unassigned
_IRREGULAR = frozenset(("Cc", "Cf", "Cs", "Co", "Cn"))


@dataclass
class SourceConfig:
    """How each recovery source is cleaned, split and packed."""

    seq_len: int = field(default=256, metadata={"help": "tokens per packed training and validation sequence"})
    val_sequences: int = field(default=16, metadata={
        "help": "held-out sequences per source on which its degradation is measured (fewer if the held-out "
                "documents are shorter)"})
    min_paragraph_tokens: int = field(default=64, metadata={
        "help": "drop paragraphs of text sources with fewer tokens than this (the paper keeps paragraphs over "
                "64 tokens; 0 = keep all)"})
    clean_chars: bool = field(default=True, metadata={
        "help": "drop irregular characters (control, format, private-use, unassigned, U+FFFD)"})

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a next-token loss needs two tokens), got {self.seq_len}")
        if self.val_sequences < 1:
            raise ConfigError(f"val_sequences must be >= 1, got {self.val_sequences}")
        if self.min_paragraph_tokens < 0:
            raise ConfigError(f"min_paragraph_tokens must be >= 0, got {self.min_paragraph_tokens}")


@dataclass
class Source:
    """One recovery source: packed training pool and held-out validation sequences."""

    name: str                 #: the data spec, as given
    kind: Kind                #: ``text`` (every token trained on) or ``instruction`` (responses only)
    train: torch.Tensor       #: ``(N, seq_len)`` token ids (prompt tokens as ``~id``)
    validation: torch.Tensor  #: ``(V, seq_len)``, from documents that are not in ``train``
    info: dict[str, Any] = field(default_factory=dict)  #: documents, split rule, cleaning counts

    def fingerprint(self) -> str:
        """SHA-256 of the validation tensor: identifies what a cached loss was measured on."""
        v = self.validation.contiguous()
        return hashlib.sha256(str(tuple(v.shape)).encode() + v.numpy().tobytes()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"spec": self.name, "kind": self.kind, "train_sequences": int(self.train.shape[0]),
                "validation_sequences": int(self.validation.shape[0]), "seq_len": int(self.train.shape[1]),
                "train_tokens": int(self.train.numel()), **self.info}


# -- cleaning --------------------------------------------------------------------------------------
def clean_text(text: str) -> str:
    """``text`` without irregular characters: control characters other than newline and tab,
    format characters (zero-width spaces, BOM, direction marks), surrogates, private-use and
    unassigned code points, and the replacement character U+FFFD. Carriage returns become newlines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(c for c in text if c in _KEEP or (c != "\ufffd" and unicodedata.category(c) not in _IRREGULAR))


def keep_long_paragraphs(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                         min_tokens: int) -> tuple[list[str], dict[str, int]]:
    """Drop the paragraphs (blank-line separated) of each text with fewer than ``min_tokens`` tokens;
    texts left empty are dropped. Returns the texts and counts of paragraphs kept and dropped."""
    paragraphs = [[p.strip() for p in _PARAGRAPH.split(t) if p.strip()] for t in texts]
    flat = [p for ps in paragraphs for p in ps]
    if min_tokens <= 0 or not flat:
        return ["\n\n".join(ps) for ps in paragraphs if ps], {"paragraphs_kept": len(flat), "paragraphs_dropped": 0}
    lengths: list[int] = []
    for start in range(0, len(flat), 256):
        encoded = tokenizer(flat[start: start + 256], add_special_tokens=False, verbose=False)["input_ids"]
        lengths.extend(len(ids) for ids in encoded)
    out, pos, kept = [], 0, 0
    for ps in paragraphs:
        long = [p for p, n in zip(ps, lengths[pos: pos + len(ps)]) if n >= min_tokens]
        pos += len(ps)
        kept += len(long)
        if long:
            out.append("\n\n".join(long))
    return out, {"paragraphs_kept": kept, "paragraphs_dropped": len(flat) - kept}


# -- splitting -------------------------------------------------------------------------------------
def _index_split(items: list[Any]) -> tuple[list[Any], list[Any]]:
    from ..data.splits import split_documents

    ids = [str(i) for i in range(len(items))]
    train_ids, _ = split_documents(ids)
    train = [x for x, i in zip(items, ids) if i in train_ids]
    validation = [x for x, i in zip(items, ids) if i not in train_ids]
    return train, validation


def _builtin_sources(spec: Any) -> tuple[str, ...]:
    """The built-in sources a training spec reads; held-out and evaluation-only data refused."""
    from ..data.builtin import BUILTIN_SOURCES, resolve_builtin

    sources, split = resolve_builtin(spec.source, spec.split)
    if split != "train" or any(BUILTIN_SOURCES[s].evaluation_only for s in sources):
        raise DataError(f"{spec} is held-out data; recovery trains on a source's train split and holds out "
                        f"its validation split itself (name the source without split=, e.g. "
                        f"builtin:{sources[0]})")
    return sources


def _split(spec: str, load: Any, *, unit: str, local_need: str) -> tuple[list[Any], list[Any], str]:
    """``(train, validation, rule)`` of ``spec`` read with ``load`` (``load_texts`` or ``load_conversations``)."""
    from ..data import parse_data_spec

    parsed = parse_data_spec(spec)
    if parsed.kind == "builtin":
        sources = _builtin_sources(parsed)
        train = load(parsed)
        validation = [x for s in sources for x in load(f"builtin:{s}", split="validation")]
        return train, validation, "built-in split by document"
    too_few = f"{spec}: too few {unit}s to hold one out for validation (need at least two"
    if parsed.kind == "local" and parsed.split is None:
        train = load(parsed, split="train")
        try:
            validation = load(parsed, split="validation")
        except DataError:
            raise DataError(f"{too_few}{local_need})") from None
        return train, validation, f"document split (10% validation, by SHA-256 of the {unit} id)"
    train, validation = _index_split(load(parsed))
    if not validation:
        raise DataError(f"{too_few})")
    return train, validation, f"document split (10% validation, by SHA-256 of the {unit} index)"


def split_texts(spec: str) -> tuple[list[str], list[str], str]:
    """``(train_texts, validation_texts, rule)`` of a text source (see the module docstring)."""
    from ..data import load_texts

    return _split(spec, load_texts, unit="document", local_need=" paragraphs or records")


def split_conversations(spec: str) -> tuple[list[Any], list[Any], str]:
    """``(train, validation, rule)`` conversations (lists of chat messages) of an instruction source."""
    from ..data import load_conversations

    return _split(spec, load_conversations, unit="record", local_need="")


# -- instruction examples --------------------------------------------------------------------------
def render_conversation(messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase,
                        *, clean: bool = True) -> list[int]:
    """Token ids of one conversation in the plain template, prompt tokens as ``~id``.

    Trained on: each assistant turn's content and the EOS that ends the conversation; everything
    else (system text, instructions, the ``### Response:`` headers, separators) is prompt.
    Each piece is tokenised on its own, so the boundary between prompt and response is exact.
    """
    pieces: list[tuple[str, bool]] = []  # (text, trained)
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if clean:
            content = clean_text(content)
        sep = "\n\n" if i else ""
        if role == "assistant":
            pieces += [(f"{sep}### Response:\n", False), (content, True)]
        elif role == "system":
            pieces.append((sep + content, False))
        else:
            pieces.append((f"{sep}### Instruction:\n{content}", False))
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False, verbose=False)["input_ids"]
    out: list[int] = []
    for (_, trained), ids in zip(pieces, encoded):
        t = torch.tensor(ids, dtype=torch.long)
        out.extend((t if trained else mask_prompt(t)).tolist())
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; instruction examples need one to end a response")
    last_is_response = bool(messages) and messages[-1]["role"] == "assistant"
    out.append(int(eos) if last_is_response else ~int(eos))
    return out


def pack_examples(examples: Sequence[Sequence[int]], seq_len: int, *, num_sequences: int | None = None,
                  seed: int = 0) -> torch.Tensor:
    """Pack token-id examples like :func:`lorashear.data.pack_texts`: shuffled with ``seed``,
    concatenated, cut into ``(N, seq_len)`` windows, the last partial window dropped."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    wanted = None if num_sequences is None else num_sequences * seq_len
    stream: list[int] = []
    for i in order:
        stream.extend(examples[i])
        if wanted is not None and len(stream) >= wanted:
            break
    n = len(stream) // seq_len
    if num_sequences is not None:
        n = min(n, num_sequences)
    if n == 0:
        raise DataError(f"not enough instruction data for one sequence of {seq_len} tokens ({len(stream)} tokens)")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, seq_len)


# -- loading ---------------------------------------------------------------------------------------
def load_source(spec: str, tokenizer: PreTrainedTokenizerBase, config: SourceConfig | None = None, *,
                kind: Kind = "text", seed: int = 0) -> Source:
    """Read, clean, split and pack one source (see the module docstring).

    Raises:
        DataError: unreadable or too small, or (for ``kind="instruction"``) not instruction data.
    """
    from ..data import pack_texts

    cfg = config or SourceConfig()
    info: dict[str, Any] = {}
    if kind == "instruction":
        train_c, val_c, rule = split_conversations(spec)
        train = pack_examples([render_conversation(c, tokenizer, clean=cfg.clean_chars) for c in train_c],
                              cfg.seq_len, seed=seed)
        val = pack_examples([render_conversation(c, tokenizer, clean=cfg.clean_chars) for c in val_c],
                            cfg.seq_len, num_sequences=cfg.val_sequences, seed=seed)
        info.update(documents={"train": len(train_c), "validation": len(val_c)}, split=rule,
                    trained_tokens="responses only")
    elif kind == "text":
        train_t, val_t, rule = split_texts(spec)
        info.update(documents={"train": len(train_t), "validation": len(val_t)}, split=rule)
        if cfg.clean_chars:
            train_t, val_t = [clean_text(t) for t in train_t], [clean_text(t) for t in val_t]
        train_t, kept_train = keep_long_paragraphs(train_t, tokenizer, cfg.min_paragraph_tokens)
        val_t, kept_val = keep_long_paragraphs(val_t, tokenizer, cfg.min_paragraph_tokens)
        info["cleaning"] = {"train": kept_train, "validation": kept_val}
        for part, texts in (("training", train_t), ("held-out", val_t)):
            if not texts:
                raise DataError(f"{spec}: no {part} paragraph has {cfg.min_paragraph_tokens} tokens or more; "
                                f"lower --min-paragraph-tokens")
        train = pack_texts(train_t, tokenizer, cfg.seq_len, seed=seed)
        val = pack_texts(val_t, tokenizer, cfg.seq_len, num_sequences=cfg.val_sequences, seed=seed)
    else:
        raise ConfigError(f"unknown source kind {kind!r}")
    logger.info("source %s: %d training and %d held-out sequences of %d tokens", spec, train.shape[0],
                val.shape[0], cfg.seq_len)
    return Source(name=spec, kind=kind, train=train, validation=val, info=info)


# -- measuring -------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(model: torch.nn.Module, data: torch.Tensor, *, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over the trained-on targets of ``data`` (nats/token)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, data.shape[0], batch_size):
            ids, labels = split_prompt_mask(data[start: start + batch_size].to(device))
            s, n = next_token_losses(model(input_ids=ids, use_cache=False).logits, labels)
            total += float(s)
            count += int(n)
    finally:
        model.train(was_training)
    return total / count if count else math.nan


def source_losses(model: torch.nn.Module, sources: Sequence[Source], *, batch_size: int = 4) -> dict[str, float]:
    """Validation loss of ``model`` on each source, by source name."""
    return {s.name: validation_loss(model, s.validation, batch_size=batch_size) for s in sources}


__all__ = ["Source", "SourceConfig", "clean_text", "keep_long_paragraphs", "load_source", "pack_examples",
           "render_conversation", "source_losses", "split_conversations", "split_texts", "validation_loss"]

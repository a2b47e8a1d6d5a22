"""Sliding-window perplexity over a concatenated token stream.

Protocol (the one in the Hugging Face perplexity guide, with exact token counts):
the texts are joined into one token stream; windows of ``seq_len`` tokens start
every ``stride`` tokens; each window scores only the tokens that no earlier window
scored (with ``stride == seq_len`` the windows are disjoint and every token but the
first of each window is scored; with ``stride < seq_len`` each newly scored token
sees at least ``seq_len - stride`` tokens of context). Perplexity is
``exp(sum of NLL / number of scored tokens)``, with the sum taken in float64 over
exactly the scored tokens (not a mean times a length).

Worked example, a 10-token stream, ``seq_len=4``, ``stride=2``::

    window [0, 4)  scores targets 1, 2, 3      (token 0 has no context)
    window [2, 6)  scores targets 4, 5         (context 2, 3)
    window [4, 8)  scores targets 6, 7
    window [6, 10) scores targets 8, 9         -> 9 tokens scored, 4 windows

With ``max_windows`` below the number of windows, ``spread=True`` (the default)
keeps windows evenly spaced over the whole stream, so a split's every document
contributes, not only the head of the stream (``spread=False``: the first
``max_windows``, the protocol before 2026-12-04). Window ``i`` of ``k`` kept out of
``n`` is number ``(2i + 1) n // 2k``: 2 of the 4 windows above are windows 1 and 3.

Beside the perplexity, a 95 % bootstrap interval over windows: windows are drawn
with replacement ``bootstrap`` times (fixed seed), each draw's perplexity is
``exp(sum NLL / sum tokens)`` of its windows, and the 2.5th and 97.5th percentiles
are reported. The per-window NLL sums are kept, so two models scored on the same
windows can be compared window by window (:func:`paired_interval`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError
from ..progress import progress_disabled

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """A perplexity and the protocol that produced it."""

    perplexity: float
    nll: float  #: mean negative log-likelihood per scored token (nats)
    num_tokens: int  #: tokens scored
    num_windows: int
    seq_len: int
    stride: int
    stream_tokens: int  #: tokens in the stream the windows were taken from
    source: str = ""  #: where the text came from (e.g. ``builtin:heldout-test``)
    spread: bool = True  #: windows spread evenly over the stream (False: its head)
    ci_low: float | None = None  #: 95 % bootstrap interval over windows (None: fewer than 2 windows)
    ci_high: float | None = None
    window_nll: list[float] = field(default_factory=list)  #: NLL sum of every window, in stream order
    window_tokens: list[int] = field(default_factory=list)  #: tokens scored in every window

    @property
    def protocol(self) -> str:
        where = "spread over" if self.spread else "from the head of"
        return (f"{self.num_windows} windows {where} {self.stream_tokens} tokens of "
                f"{self.source or 'the given stream'}: seq_len {self.seq_len}, stride {self.stride}, "
                f"{self.num_tokens} tokens scored")

    @property
    def interval(self) -> str:
        """``"[lo, hi]"`` or an empty string."""
        return "" if self.ci_low is None else f"[{self.ci_low:.2f}, {self.ci_high:.2f}]"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["protocol"] = self.protocol
        return out


def window_spans(stream_len: int, seq_len: int, stride: int,
                 max_windows: int | None = None, spread: bool = False) -> list[tuple[int, int, int]]:
    """The ``(begin, end, num_scored)`` spans of the protocol (see the module docstring).

    The last ``num_scored`` tokens of ``stream[begin:end]`` are the window's targets.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if stream_len < 2:
        raise DataError(f"the token stream has {stream_len} token(s); perplexity needs at least 2")
    spans = []
    prev_end = 0
    for begin in range(0, stream_len, stride):
        end = min(begin + seq_len, stream_len)
        # Targets are positions begin+1 .. end-1; score those not scored before.
        num_scored = end - max(prev_end, begin + 1)
        if num_scored > 0:
            spans.append((begin, end, num_scored))
        prev_end = end
        if end == stream_len or (not spread and max_windows is not None and len(spans) >= max_windows):
            break
    if spread and max_windows is not None and max_windows < len(spans):
        n, k = len(spans), max_windows
        spans = [spans[(2 * i + 1) * n // (2 * k)] for i in range(k)]
    return spans


def bootstrap_interval(window_nll: list[float], window_tokens: list[int], *, samples: int = 2000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``exp(sum nll / sum tokens)`` over windows (None: < 2 windows)."""
    import torch

    if len(window_nll) < 2:
        return None
    nll = torch.tensor(window_nll, dtype=torch.float64)
    tok = torch.tensor(window_tokens, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randint(len(window_nll), (samples, len(window_nll)), generator=gen)  # (S, W)
    ppl = torch.exp((nll[draw].sum(1) / tok[draw].sum(1)).clamp(max=700))
    lo, hi = torch.quantile(ppl, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


def paired_interval(a: PerplexityResult, b: PerplexityResult, *, samples: int = 2000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float]:
    """``(difference, lo, hi)`` of perplexity ``b - a`` on the same windows, windows resampled in pairs."""
    if a.window_tokens != b.window_tokens or not a.window_tokens:
        raise ConfigError("paired_interval needs two results scored on the same windows")
    return paired_window_interval(a.window_nll, b.window_nll, a.window_tokens, samples=samples, level=level,
                                  seed=seed)


def paired_window_interval(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[float], *,
                           samples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """:func:`paired_interval` from per-window NLL sums of two models on the same windows and the tokens each
    window scores (as row files keep them)."""
    import torch

    nll = torch.tensor([list(nll_a), list(nll_b)], dtype=torch.float64)  # (2, W)
    tok = torch.tensor(list(tokens), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randint(tok.numel(), (samples, tok.numel()), generator=gen)
    ppl = torch.exp(nll[:, draw].sum(-1) / tok[draw].sum(-1))  # (2, S)
    diff = ppl[1] - ppl[0]
    lo, hi = torch.quantile(diff, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    point = torch.exp(nll.sum(-1) / tok.sum())  # (2,)
    return float(point[1] - point[0]), lo, hi


def perplexity(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    seq_len: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    source: str = "",
    spread: bool = True,
) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on a token stream.

    Args:
        input_ids: the token stream, ``(T,)``; a ``(N, L)`` tensor is flattened row by row.
        seq_len: window length (tokens the model sees at once).
        stride: distance between window starts (default ``seq_len``: disjoint windows).
        max_windows: score this many windows (``None``: cover the whole stream).
        batch_size: windows per forward pass (windows of equal length are batched).
        source: a label for the stream, recorded in the result.
        spread: with ``max_windows``, spread the windows evenly over the stream (else take its head).
    """
    import torch
    from tqdm.auto import tqdm

    stride = seq_len if stride is None else stride
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    stream = input_ids.reshape(-1).long()
    spans = window_spans(stream.numel(), seq_len, stride, max_windows, spread)
    device = next(model.parameters()).device
    window_nll: list[float] = []
    window_tokens: list[int] = []
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(spans), desc="perplexity", unit="window", disable=progress_disabled())
    try:
        i = 0
        while i < len(spans):
            length = spans[i][1] - spans[i][0]
            batch = [spans[i]]
            while len(batch) < batch_size and i + len(batch) < len(spans):
                nxt = spans[i + len(batch)]
                if nxt[1] - nxt[0] != length:
                    break
                batch.append(nxt)
            ids = torch.stack([stream[b:e] for b, e, _ in batch]).to(device)  # (B, L)
            with torch.inference_mode():
                logits = model(input_ids=ids, use_cache=False).logits  # (B, L, V)
            shifted = logits[:, :-1].float()  # (B, L-1, V): predictions for targets 1..L-1
            nll = torch.nn.functional.cross_entropy(
                shifted.reshape(-1, shifted.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view(ids.shape[0], -1)  # (B, L-1)
            for row, (_, _, num_scored) in enumerate(batch):
                window_nll.append(nll[row, -num_scored:].double().sum().item())
                window_tokens.append(num_scored)
            i += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    total_tokens = sum(window_tokens)
    mean_nll = math.fsum(window_nll) / total_tokens
    interval = bootstrap_interval(window_nll, window_tokens)
    return PerplexityResult(
        perplexity=math.exp(mean_nll) if mean_nll < 700 else float("inf"),
        nll=mean_nll,
        num_tokens=total_tokens,
        num_windows=len(spans),
        seq_len=seq_len,
        stride=stride,
        stream_tokens=int(stream.numel()),
        source=source,
        spread=spread,
        ci_low=interval[0] if interval else None,
        ci_high=interval[1] if interval else None,
        window_nll=window_nll,
        window_tokens=window_tokens,
    )


def load_eval_texts(source: str) -> list[str]:
    """Texts for perplexity, read through the data layer (:func:`lorashear.data.load_texts`): a
    ``.txt`` file (paragraphs split on blank lines), a ``.jsonl`` file (a ``text`` field per line),
    a folder, a built-in corpus, ... A missing, empty or binary source is a one-line :class:`DataError`."""
    from ..data import load_texts

    texts = [t for t in load_texts(source) if t.strip()]
    if not texts:
        raise DataError(f"perplexity source {source!r} has no text")
    return texts


def token_stream(texts: list[str], tokenizer: PreTrainedTokenizerBase, *, separator: str = "\n\n",
                 max_tokens: int | None = None) -> torch.Tensor:
    """Join ``texts`` with ``separator`` and tokenise once (no special tokens): ``(T,)``."""
    import torch

    ids = tokenizer(separator.join(texts), add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


__all__ = ["PerplexityResult", "bootstrap_interval", "load_eval_texts", "paired_interval", "perplexity",
           "token_stream", "window_spans"]

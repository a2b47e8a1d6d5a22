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
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
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
    source: str = ""  #: where the text came from (e.g. ``builtin:heldout``)

    @property
    def protocol(self) -> str:
        return (f"sliding window over {self.stream_tokens} tokens of {self.source or 'the given stream'}: "
                f"seq_len {self.seq_len}, stride {self.stride}, {self.num_windows} windows, "
                f"{self.num_tokens} tokens scored")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["protocol"] = self.protocol
        return out


def window_spans(stream_len: int, seq_len: int, stride: int,
                 max_windows: int | None = None) -> list[tuple[int, int, int]]:
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
        if end == stream_len or (max_windows is not None and len(spans) >= max_windows):
            break
    return spans


def perplexity(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    seq_len: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    source: str = "",
) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on a token stream.

    Args:
        input_ids: the token stream, ``(T,)``; a ``(N, L)`` tensor is flattened row by row.
        seq_len: window length (tokens the model sees at once).
        stride: distance between window starts (default ``seq_len``: disjoint windows).
        max_windows: stop after this many windows (``None``: cover the whole stream).
        batch_size: windows per forward pass (windows of equal length are batched).
        source: a label for the stream, recorded in the result.
    """
    import torch
    from tqdm.auto import tqdm

    stride = seq_len if stride is None else stride
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    stream = input_ids.reshape(-1).long()
    spans = window_spans(stream.numel(), seq_len, stride, max_windows)
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
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
                total_nll += nll[row, -num_scored:].double().sum().item()
                total_tokens += num_scored
            i += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    return PerplexityResult(
        perplexity=math.exp(mean_nll) if mean_nll < 700 else float("inf"),
        nll=mean_nll,
        num_tokens=total_tokens,
        num_windows=len(spans),
        seq_len=seq_len,
        stride=stride,
        stream_tokens=int(stream.numel()),
        source=source,
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


__all__ = ["PerplexityResult", "load_eval_texts", "perplexity", "token_stream", "window_spans"]

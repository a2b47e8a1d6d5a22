"""Speed and size: parameters, checkpoint bytes, prefill latency, generation throughput, peak memory.

Protocol: prompts of ``prompt_len`` random token ids (fixed seed; content does not
change the cost of a dense forward pass) at each batch size; ``warmup`` untimed
runs, then ``repeats`` timed ones, reporting the median.

- *prefill latency*: one forward pass over the prompt, building the KV cache;
- *generation*: ``model.generate`` greedy, exactly ``new_tokens`` new tokens per
  sequence; ``generate_tokens_per_s = batch * new_tokens / wall time`` (prefill
  included) and ``decode_tokens_per_s = batch * (new_tokens - 1) / (wall time -
  median prefill)`` (the per-token decoding steps alone);
- *peak memory*: on CUDA ``torch.cuda.max_memory_allocated`` during the benchmark;
  on CPU the peak resident set size (RSS, psutil, sampled every 10 ms) during the
  benchmark. RSS counts everything the process holds, so compare models measured
  the same way: :func:`measure_speed_isolated` runs each model in a fresh
  subprocess, where the peak RSS (and ``getrusage``'s max RSS) belongs to that model alone.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, LorashearError
from ..progress import progress_disabled

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


@dataclass
class BatchTiming:
    batch_size: int
    prefill_ms: float  #: median prefill latency
    generate_s: float  #: median wall time of one generate() call
    generate_tokens_per_s: float  #: batch * new_tokens / generate_s
    decode_tokens_per_s: float  #: batch * (new_tokens - 1) / (generate_s - prefill)
    prefill_ms_all: list[float] = field(default_factory=list)
    generate_s_all: list[float] = field(default_factory=list)


@dataclass
class SpeedResult:
    """Size and speed of one model, with the protocol."""

    num_parameters: int
    parameter_bytes: int  #: bytes of the parameters in memory
    checkpoint_bytes: int | None  #: bytes of the model directory on disk (None for in-memory models)
    weights_bytes: int | None  #: bytes of its weight files (*.safetensors, *.bin)
    device: str
    dtype: str
    prompt_len: int
    new_tokens: int
    repeats: int
    warmup: int
    torch_threads: int
    batches: list[BatchTiming]
    peak_memory_bytes: int  #: see ``peak_memory_kind``
    peak_memory_kind: str  #: "cuda_max_allocated" or "rss"
    baseline_memory_bytes: int  #: RSS / allocated memory just before the benchmark
    process_max_rss_bytes: int | None = None  #: getrusage max RSS of an isolated subprocess
    isolated: bool = False

    def batch(self, batch_size: int) -> BatchTiming | None:
        return next((b for b in self.batches if b.batch_size == batch_size), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeedResult:
        data = dict(data)
        data["batches"] = [BatchTiming(**b) for b in data.get("batches", [])]
        return cls(**data)


def directory_bytes(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(all bytes, weight-file bytes) of the files under ``path``."""
    total = weights = 0
    for p in Path(path).rglob("*"):
        if p.is_file() and not p.is_symlink():
            size = p.stat().st_size
            total += size
            if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
                weights += size
    return total, weights


def count_parameters(model: PreTrainedModel) -> tuple[int, int]:
    """(number, bytes) of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    n = nbytes = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
        nbytes += p.numel() * p.element_size()
    return n, nbytes


class _PeakRSS:
    """Sample the process RSS in a background thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.start_rss = self._proc.memory_info().rss
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(
    model: PreTrainedModel,
    *,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 5,
    warmup: int = 1,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> SpeedResult:
    """Measure ``model`` in this process (see the module docstring for the protocol).

    ``checkpoint_dir``: the model's directory, for its size on disk.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if prompt_len < 1 or new_tokens < 2 or repeats < 1 or warmup < 0 or not batch_sizes:
        raise ConfigError("speed: need prompt_len >= 1, new_tokens >= 2, repeats >= 1, warmup >= 0, a batch size")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    num_params, param_bytes = count_parameters(model)
    ckpt_bytes = weights_bytes = None
    if checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
        ckpt_bytes, weights_bytes = directory_bytes(checkpoint_dir)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(seed)
    pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    gen_config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=pad, eos_token_id=None, use_cache=True)
    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    sampler = _PeakRSS()
    if device.type != "cuda":
        baseline = sampler.start_rss
    batches: list[BatchTiming] = []
    total = len(batch_sizes) * (warmup + repeats) * 2
    bar = tqdm(total=total, desc="speed", unit="run", disable=progress_disabled())
    try:
        with sampler, torch.inference_mode():
            for bs in batch_sizes:
                ids = torch.randint(0, vocab, (bs, prompt_len), generator=gen).to(device)  # (B, T)
                mask = torch.ones_like(ids)
                prefill: list[float] = []
                for i in range(warmup + repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(input_ids=ids, attention_mask=mask, use_cache=True)
                    _sync(device)
                    if i >= warmup:
                        prefill.append((time.perf_counter() - t0) * 1000.0)
                    bar.update(1)
                generate: list[float] = []
                for i in range(warmup + repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
                    _sync(device)
                    if i >= warmup:
                        generate.append(time.perf_counter() - t0)
                    if out.shape[1] != prompt_len + new_tokens:
                        raise LorashearError(f"generate produced {out.shape[1] - prompt_len} tokens, "
                                             f"expected {new_tokens}")
                    bar.update(1)
                prefill_ms = statistics.median(prefill)
                gen_s = statistics.median(generate)
                decode_s = max(gen_s - prefill_ms / 1000.0, 1e-9)
                batches.append(BatchTiming(
                    batch_size=bs, prefill_ms=prefill_ms, generate_s=gen_s,
                    generate_tokens_per_s=bs * new_tokens / gen_s,
                    decode_tokens_per_s=bs * (new_tokens - 1) / decode_s,
                    prefill_ms_all=[round(x, 3) for x in prefill], generate_s_all=[round(x, 5) for x in generate],
                ))
                logger.info("batch %d: prefill %.1f ms, generate %.1f tok/s (decode %.1f tok/s)",
                            bs, prefill_ms, bs * new_tokens / gen_s, bs * (new_tokens - 1) / decode_s)
    finally:
        bar.close()
        model.train(was_training)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        peak, kind = sampler.peak, "rss"
    return SpeedResult(
        num_parameters=num_params, parameter_bytes=param_bytes, checkpoint_bytes=ckpt_bytes,
        weights_bytes=weights_bytes, device=str(device), dtype=str(dtype).removeprefix("torch."),
        prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
        torch_threads=torch.get_num_threads(), batches=batches, peak_memory_bytes=int(peak),
        peak_memory_kind=kind, baseline_memory_bytes=int(baseline),
    )


def _max_rss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def measure_speed_isolated(
    model_name: str,
    *,
    dtype: str = "float32",
    device: str | None = None,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    timeout: float | None = None,
) -> SpeedResult:
    """Load ``model_name`` in a fresh Python process and measure it there.

    Peak memory then belongs to this model alone (also ``process_max_rss_bytes``).
    """
    args = {"model": model_name, "dtype": dtype, "device": device, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "batch_sizes": list(batch_sizes), "repeats": repeats, "warmup": warmup,
            "threads": threads}
    env = dict(os.environ, LORASHEAR_DISABLE_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-m", "lorashear.evaluation.speed", json.dumps(args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise LorashearError(f"speed measurement of {model_name} failed in its subprocess: "
                             f"{lines[-1] if lines else 'exit ' + str(proc.returncode)}")
    result = SpeedResult.from_dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    result.isolated = True
    return result


def _subprocess_main(argv: Sequence[str]) -> int:
    from ..models.loading import load_model, resolve_model_path

    args = json.loads(argv[0])
    if args.get("threads"):
        import torch

        torch.set_num_threads(int(args["threads"]))
    resolved = resolve_model_path(args["model"])
    model = load_model(args["model"], dtype=args["dtype"], device=args["device"])
    result = measure_speed(model, prompt_len=args["prompt_len"], new_tokens=args["new_tokens"],
                           batch_sizes=args["batch_sizes"], repeats=args["repeats"], warmup=args["warmup"],
                           checkpoint_dir=resolved if Path(resolved).is_dir() else None)
    result.process_max_rss_bytes = _max_rss_bytes()
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through measure_speed_isolated
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_subprocess_main(sys.argv[1:]))


__all__ = ["BatchTiming", "SpeedResult", "count_parameters", "directory_bytes", "measure_speed",
           "measure_speed_isolated"]

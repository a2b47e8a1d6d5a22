"""The distillation loss composed by autograd against the one-pass kernel (``soft_target_loss``), side by side.

    python benchmarks/distill_loss_speed.py --threads 1 --out benchmarks/results/distill_loss_speed

Times, interleaved on the same inputs (median of ``--repeats``):
- the loss alone, forward and backward, on logits of the reference model's shape (2 x 256 x 49152):
  the cross-entropy and ``kl_to_teacher`` composed (as the prune stage took them until 2026-12-06: the
  model's own cross-entropy from ``labels``, then the KL over the same logits) against ``soft_target_loss``;
- one training step of the reference model with LoRA and the KL share 0.5 (the prune stage's warm-up and
  pruning steps): the student's forward and backward, the bfloat16 teacher's forward, and the loss, both ways;
- for scale, a step with cross-entropy only (the steps after pruning) and the teacher's forward alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def timed(fn) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default=None, help="path without suffix for the result (JSON and markdown)")
    a = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    import lorashear
    import quality
    from lorashear.training.losses import kl_to_teacher, make_teacher
    from lorashear.training.soft_targets import soft_target_loss

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = lorashear.load_model(quality.MODEL)
    teacher = make_teacher(model, "auto")
    student = get_peft_model(model, LoraConfig(r=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    student.train()
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (a.batch, a.seq_len))
    with torch.no_grad():
        t_logits = teacher(input_ids=batch, use_cache=False).logits
        s_logits = student(input_ids=batch, use_cache=False).logits.detach()
    w = 0.5

    def loss_composed() -> None:
        z = s_logits.clone().requires_grad_(True)
        ce = torch.nn.functional.cross_entropy(z[:, :-1].reshape(-1, vocab), batch[:, 1:].reshape(-1))
        ((1 - w) * ce + w * kl_to_teacher(z, t_logits)).backward()

    def loss_fused() -> None:
        z = s_logits.clone().requires_grad_(True)
        soft_target_loss(z, t_logits, batch, w)[0].backward()

    def step_composed() -> None:
        out = student(input_ids=batch, labels=batch, use_cache=False)
        with torch.no_grad():
            tl = teacher(input_ids=batch, use_cache=False).logits
        ((1 - w) * out.loss + w * kl_to_teacher(out.logits, tl)).backward()
        student.zero_grad(set_to_none=True)

    def step_fused() -> None:
        logits = student(input_ids=batch, use_cache=False).logits
        with torch.no_grad():
            tl = teacher(input_ids=batch, use_cache=False).logits
        soft_target_loss(logits, tl, batch, w)[0].backward()
        student.zero_grad(set_to_none=True)

    def step_ce() -> None:
        student(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        student.zero_grad(set_to_none=True)

    def teacher_fwd() -> None:
        with torch.no_grad():
            teacher(input_ids=batch, use_cache=False)

    cases = {"loss composed": loss_composed, "loss one-pass": loss_fused, "KD step composed": step_composed,
             "KD step one-pass": step_fused, "CE-only step": step_ce, "teacher forward (bf16 where native)":
             teacher_fwd}
    for fn in cases.values():  # warm-up
        fn()
    times = {name: [] for name in cases}
    for _ in range(a.repeats):  # interleaved: every case once per round
        for name, fn in cases.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {"loss": med["loss composed"] / med["loss one-pass"],
              "KD step": med["KD step composed"] / med["KD step one-pass"]}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    lines = [f"{a.batch} x {a.seq_len} tokens, vocabulary {vocab}, torch threads {a.threads}, KL share {w}, "
             f"median of {a.repeats} interleaved rounds ({machine})"]
    lines += [f"{name}: {sec:.3f} s" for name, sec in med.items()]
    lines += [f"composed / one-pass: loss {ratios['loss']:.2f}x, KD step {ratios['KD step']:.2f}x"]
    print("\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.with_suffix(".json").write_text(json.dumps({"median_s": med, "ratios": ratios, "machine": machine,
                                                       "threads": a.threads, "batch": a.batch,
                                                       "seq_len": a.seq_len, "repeats": a.repeats}, indent=2))
        command = "python benchmarks/distill_loss_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
        out.with_suffix(".md").write_text("# The distillation loss: composed by autograd against one pass\n\n"
                                          f"```\n{command}\n```\n\n```\n" + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cost of an LHSPG step next to a plain LoRA AdamW step (same model, batch, sequence length).

    python benchmarks/bench_lhspg_step.py                                   # reference model, CPU
    python benchmarks/bench_lhspg_step.py --shape 7b --device cuda --dtype bf16 --grad-checkpointing

Both variants run in one process, interleaved step by step on the same model
(plain: forward, backward, AdamW on the LoRA factors; LHSPG: the same, then
``LHSPG.post_step``). Timed steps sit inside the *second* pruning period, so a
step pays for the progressive forgetting of that period's redundant groups
(a target of ``--ratio``, half of it) and for holding the first period's
committed groups at zero. The first period is fast-forwarded with ``post_step``
alone. Peak memory: CUDA ``max_memory_allocated`` per phase; on CPU the peak
resident set sampled every millisecond during each phase.

``--shape 7b`` builds a randomly initialised LLaMA-7B-shaped model on the meta
device and materialises it on ``--device`` (on CPU only with ``--layers`` small).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


class PeakRSS:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def build_model(args, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.shape == "reference":
        from lorashear.models.loading import load_model

        return load_model("smollm2-135m-instruct", dtype=dtype).to(args.device)
    if args.shape == "7b":
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers or 32,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                          max_position_embeddings=4096)
    else:  # tiny
        cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=args.layers or 4,
                          num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=args.device).to(dtype)
    with torch.no_grad():
        gen = torch.Generator(device=args.device).manual_seed(0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)

    # the rotary buffers were created on the meta device: rebuild them for real
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(args.device)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["reference", "tiny", "7b"], default="reference")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (7b/tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--fisher", action="store_true",
                    help="LHSPG with the fisher saliency: activation-statistics hooks on in its steps (off in plain)")
    ap.add_argument("--transfer", action="store_true",
                    help="LHSPG with --transfer: input-Gram hooks on in its steps (off in plain), the fading columns' "
                         "least-squares maps applied at every step")
    ap.add_argument("--transfer-token-stride", type=int, default=8, help="as lorashear prune's option")
    args = ap.parse_args(argv)
    if args.shape == "7b" and args.device == "cpu" and not args.layers:
        ap.error("--shape 7b on CPU needs --layers (e.g. --layers 1)")

    import lorashear
    from lorashear.lhspg import LHSPG, LHSPGConfig, TargetConfig, plan_targets
    from lorashear.models.lora import LoraSettings, attach_lora
    from lorashear.models.params import count_params, embedding_params

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cuda = args.device.startswith("cuda")
    model = build_model(args, dtype)
    before = count_params(model)
    emb = embedding_params(model)
    model = attach_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0))  # q,k,v,o,gate,up,down
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    t = time.perf_counter()
    graph = lorashear.discover(model)
    t_discover = time.perf_counter() - t
    plan = plan_targets(graph.prunable(), total_params=before, embedding_params=emb,
                        config=TargetConfig(ratio=args.ratio), all_groups=graph.groups)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n = args.warmup + args.steps
    period = 2 * n + 1  # every interleaved LHSPG step of the timed phase falls in period 1
    fisher = None
    if args.fisher:
        from lorashear.lhspg.hooks import ActivationFisher

        fisher = ActivationFisher(model, [g for g in graph.prunable() if g.kind in plan.counts])
    grams = None
    if args.transfer:
        from lorashear.lhspg.hooks import ActivationGram

        grams = ActivationGram.for_groups(model, [g for g in graph.prunable() if g.kind in plan.counts],
                                          token_stride=args.transfer_token_stride)
    lh = LHSPG(model, graph.groups, inner, plan=plan, data_scores={"fisher": fisher} if fisher is not None else None,
               grams=grams,
               config=LHSPGConfig(warmup_steps=1, num_periods=2, period_steps=period, transfer=args.transfer,
                                  saliency=("fisher",) if fisher is not None else LHSPGConfig().saliency))
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len), device=args.device)
    model.train()

    def fwd_bwd():
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda and dtype == torch.bfloat16):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # warm-up of LoRA (its forward pass fills the Grams of --transfer), then fast-forward through
    # period 0 (post_step only) to reach period 1
    fwd_bwd(); inner.step(); inner.zero_grad()
    lh.post_step()
    t = time.perf_counter()
    for _ in range(period):
        lh.post_step()
    t_ff = time.perf_counter() - t
    assert lh.selected_period == 1 and len(lh.committed) > 0, "did not reach period 1"
    assert not args.transfer or lh._transfer, "no transfer maps in period 1"  # noqa: SLF001

    def run(variant: str, count: int, times: list[float] | None):
        for hook in (fisher, grams):
            if hook is not None:
                hook.enabled = variant == "lhspg"
        for _ in range(count):
            sync()
            t0 = time.perf_counter()
            fwd_bwd()
            if variant == "lhspg":
                lh.step()
            else:
                inner.step()
            inner.zero_grad(set_to_none=True)
            sync()
            if times is not None:
                times.append(time.perf_counter() - t0)

    run("plain", args.warmup, None)
    run("lhspg", args.warmup, None)
    plain_t, lh_t = [], []
    for _ in range(args.steps):  # interleaved
        run("plain", 1, plain_t)
        run("lhspg", 1, lh_t)
    post = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            lh._forget(0, False)  # noqa: SLF001 - timing the update alone
            lh._hold()  # noqa: SLF001
        sync()
        post.append(time.perf_counter() - t0)

    def peak(variant):
        if cuda:
            torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            run(variant, 2, None)
            return torch.cuda.max_memory_allocated()
        with PeakRSS() as m:
            run(variant, 2, None)
        return m.peak

    mem_plain = peak("plain")
    mem_lh = peak("lhspg")
    mp, ml = statistics.median(plain_t), statistics.median(lh_t)
    unit = "GPU max_memory_allocated" if cuda else "peak RSS"
    print(f"model: {args.shape} ({before / 1e6:.1f}M params{', ' + str(args.layers) + ' layers' if args.layers else ''}), "
          f"device {args.device}, dtype {args.dtype}, batch {args.batch_size} x {args.seq_len}, "
          f"grad checkpointing {'on' if args.grad_checkpointing else 'off'}, torch threads {torch.get_num_threads()}, "
          f"fisher hooks {'on in LHSPG steps' if fisher is not None else 'off'}, "
          f"transfer {f'on (Gram hooks in LHSPG steps, every {args.transfer_token_stride}th token)' if grams is not None else 'off'}")
    print(f"groups: {len(graph.groups)} ({len(graph.prunable())} prunable), discovery {t_discover:.2f} s; "
          f"target {args.ratio:.0%} -> {plan.counts}")
    print(f"period 1: {len(lh.redundant)} redundant groups fading, {len(lh.committed)} committed held at 0 "
          f"(period 0 fast-forward: {period} post_steps in {t_ff:.2f} s)")
    print(f"plain LoRA AdamW step: median {mp * 1e3:.1f} ms  (n={len(plain_t)})")
    print(f"LHSPG step:            median {ml * 1e3:.1f} ms  (n={len(lh_t)})")
    print(f"  LHSPG update alone (forgetting + hold): median {statistics.median(post) * 1e3:.1f} ms")
    print(f"time ratio LHSPG / plain: {ml / mp:.3f}  (target <= 1.10)")
    print(f"peak memory ({unit}): plain {mem_plain / 2**20:.0f} MiB, LHSPG {mem_lh / 2**20:.0f} MiB, "
          f"ratio {mem_lh / mem_plain:.3f}  (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What one period cut costs on the reference model (``--compact-at period_end``).

Builds LHSPG with the activation-Fisher scorer over the reference model with LoRA, commits the given numbers of MLP
channels (spread over the layers, as a period's selection is) and times :meth:`PeriodCompaction.compact_committed`
for each: slicing the model and AdamW's state, re-indexing LHSPG and the scorer, and the 16-token logit check.

    python benchmarks/period_cut_cost.py --threads 2 --cuts 9045,7243
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--cuts", default="9045,7243", help="MLP channels committed before each cut (the 50% run's first two)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from lorashear.graph.discover import discover
    from lorashear.lhspg.compacting import PeriodCompaction
    from lorashear.lhspg.hooks import ActivationFisher
    from lorashear.lhspg.optimizer import LHSPG, LHSPGConfig
    from lorashear.lhspg.targets import TargetConfig, plan_targets
    from lorashear.models.loading import load_model
    from lorashear.models.lora import LoraSettings, attach_lora
    from lorashear.models.params import count_params, embedding_params
    from lorashear.training.optim import lora_parameters, make_optimizer

    model = load_model(quality.MODEL)
    total, emb = count_params(model), embedding_params(model)
    peft = attach_lora(model, LoraSettings())
    graph = discover(peft)
    candidates = [g for g in graph.groups if g.prunable]
    plan = plan_targets(candidates, total_params=total, embedding_params=emb, config=TargetConfig(ratio=a.ratio),
                        all_groups=graph.groups)
    fisher = ActivationFisher(peft, [g for g in candidates if g.kind in plan.counts])
    lh = LHSPG(peft, graph.groups, make_optimizer(lora_parameters(peft), "adamw", 1e-3, 0.0), plan=plan,
               config=LHSPGConfig(saliency=("fisher",)).resolve(100), data_scores={"fisher": fisher})
    cuts = PeriodCompaction(peft, lh, scorers=[fisher], probe=torch.randint(0, 1000, (1, 16)), seq_len=256)
    mlp = sorted((i for i, g in enumerate(lh.candidates) if g.kind == "mlp_channel"),
                 key=lambda i: (lh.candidates[i].index, lh.candidates[i].layer))
    for n in (int(x) for x in a.cuts.split(",")):
        lh.committed.extend([i for i in mlp if i not in lh.compacted and i not in lh.committed][:n])
        t = time.perf_counter()
        cuts.compact_committed()
        print(f"cut of {n} MLP channels: {time.perf_counter() - t:.2f} s ({a.threads} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Do the period cuts change what LHSPG selects? The Fisher scores at every selection, masked against cut.

Runs the headline recipe on the reference model twice for the first steps of a 100-step schedule, once with the
structures cut out only when pruning ends (``--compact-at prune_end``: masked during the periods) and once cut out
at every period end, and prints how far the activation-Fisher scores of the candidates differ at each selection.
Without dropout they differ by float rounding only; with LoRA dropout the random masks follow the tensor shapes,
so the draws (and the scores) differ from the first cut on.

    python benchmarks/selection_drift.py --ratio 0.5 --lora-dropout 0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--stop-after", type=int, default=22, help="steps of each run (the cuts start at step 14)")
    p.add_argument("--lora-dropout", type=float, default=None, help="default: the recipe's")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from lorashear.config import config_from_dict
    from lorashear.lhspg.optimizer import LHSPG
    from lorashear.stages import prune
    from lorashear.stages.prune import PruneConfig

    scores: dict[str, list[tuple[int, torch.Tensor]]] = {}
    select = LHSPG._select
    mode = ""

    def spy(self: LHSPG, period: int) -> None:
        if "fisher" in self.data_scores:
            scores.setdefault(mode, []).append((self.step_count, self.data_scores["fisher"].scores(self.candidates)))
        select(self, period)

    LHSPG._select = spy  # type: ignore[method-assign]
    extra = {} if a.lora_dropout is None else {"lora_dropout": a.lora_dropout}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("prune_end", "period_end"):
            values = {"model": quality.MODEL, "out": str(Path(tmp) / mode), "ratio": a.ratio, "steps": 100,
                      "batch_size": 2, "seq_len": 256, "seed": 0, "progress": False,
                      **quality.LORASHEAR_ROWS[quality.HEADLINE], "compact_at": mode, **extra}
            prune.run(config_from_dict(PruneConfig, values), stop_after=a.stop_after)
    for (step, x), (_, y) in zip(scores["prune_end"], scores["period_end"]):
        both = torch.isfinite(x) & torch.isfinite(y) & (x > 0)
        rel = ((x - y).abs() / x.abs())[both]
        print(f"selection at step {step}: relative difference median {float(rel.median()):.2e}, "
              f"99th percentile {float(rel.quantile(0.99)):.2e}, max {float(rel.max()):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

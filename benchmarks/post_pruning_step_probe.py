"""The LoRA model as it enters post-pruning training: its step time on one batch (issue 26's throughput question).

    OMP_NUM_THREADS=2 python benchmarks/post_pruning_step_probe.py lorashear-1206 0.2
    OMP_NUM_THREADS=2 python benchmarks/post_pruning_step_probe.py lorashear-1206-periodic 0.2

Runs the prune stage of a ``quality.py`` row (100 steps) and, where the small model would start training after
pruning, times 8 forward and backward passes of the training loss on the first batch instead, then stops. It
writes what it saw (attention attributes, parameter layouts, step times) to /tmp/prof/diag_ROW_RATIO.json.
Session 22: 1.441 s (cut once) against 1.435 s (period cuts), medians of steps 3-8, two threads, alone.
"""
import json
import os
import statistics
import sys
import time

import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)
from quality import LORASHEAR_ROWS, MODEL
from lorashear.config import config_from_dict
from lorashear.stages import prune as ps
from lorashear.stages.prune import PruneConfig

class Stop(Exception):
    pass

row = sys.argv[1]; ratio = float(sys.argv[2])
captured = {}
def fake_train_loop(model, data, **kw):
    model.train()
    batch = data[:2]
    info = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            info[name] = {k: getattr(m, k, None) for k in ("num_key_value_groups", "head_dim", "scaling", "is_causal")}
            info[name]["q"] = tuple(m.q_proj.base_layer.weight.shape) if hasattr(m.q_proj, "base_layer") else None
    params = [(n, tuple(p.shape), p.stride(), p.requires_grad, p.is_contiguous(), p.data_ptr() % 64,
               p.untyped_storage().nbytes() // p.element_size() - p.numel()) for n, p in model.named_parameters()]
    loss_fn = kw["loss_fn"]
    times = []
    for i in range(8):
        t = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    captured.update(info=info, params=params, times=times)
    raise Stop()
ps.train_loop = fake_train_loop
values = {"model": MODEL, "out": f"/tmp/prof/diag_{row}_{ratio}", "ratio": ratio, "steps": 100, "batch_size": 2,
          "seq_len": 256, "seed": 0, "progress": False, "log_every": 10, "force": True, **LORASHEAR_ROWS[row]}
try:
    ps.run(config_from_dict(PruneConfig, values))
except Stop:
    pass
json.dump(captured, open(f"/tmp/prof/diag_{row}_{ratio}.json", "w"), default=str)
print(row, "step times", [round(t, 3) for t in captured["times"]], "median", statistics.median(captured["times"][2:]))

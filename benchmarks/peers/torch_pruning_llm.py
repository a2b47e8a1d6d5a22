"""Peer baseline: LLM-Pruner-style structured pruning of a Llama-family model with Torch-Pruning.

What it does (the recipe of LLM-Pruner, Ma et al. 2023, with Torch-Pruning's dependency graph
and importance, following Torch-Pruning's ``examples/LLMs/prune_llm.py``):

1. gradients of the language-model loss on a few calibration sequences (the same
   packed ``builtin:calibration`` data the lorashear run trains on);
2. Torch-Pruning's ``DependencyGraph`` gives each layer's coupled groups (MLP channel:
   gate/up rows + down_proj column; attention: q_proj rows + o_proj columns), scored by
   ``tp.importance.GroupTaylorImportance`` (first-order Taylor ``|w * dL/dw|`` summed over
   every weight of the group: LLM-Pruner's ``param_first``); ranking is local (per layer).
   Attention is pruned by whole heads (head score = mean over its channels; RoPE pairs
   dimensions inside a head), with GQA the same number of query heads from every KV group,
   k/v kept: the selection rules of ``tp.pruner.BasePruner``'s GQA branch
   (``prune_num_heads=True, prune_head_dims=False``), applied directly, because
   ``BasePruner`` itself fails on this model (see below). ``group.prune()`` cuts the weights;
3. only decoder layers ``[layer_start, num_layers + layer_end)`` are pruned, each by
   the same amount, like LLM-Pruner's block-wise defaults (layers 4..29 of 32: the
   first four and the last two are kept); the hidden size, embeddings and lm_head are
   never pruned;
4. the amount per pruned layer is solved so the *whole* model (embeddings counted)
   loses ``ratio`` of its parameters, as lorashear's ``--ratio`` does: query heads per
   KV group first (the nearest whole number to the layer fraction), MLP channels make
   up the rest (rounded to ``round_to``);
5. the model's config is rewritten (``per_layer_config`` for layers of different
   widths, exactly as :func:`lorashear.compact` does) and saved with
   :func:`lorashear.save_pretrained`; the directory loads with ``lorashear.load_pretrained``.

Known issues worked around (Torch-Pruning 1.6.1, transformers 5.23):

- building the attention group of a Llama never finishes (the index mapping through
  RoPE's ``rotate_half`` slice/neg/cat cycles forever). The dependency graph is traced
  with ``apply_rotary_pos_emb`` replaced by the identity; RoPE acts inside a head, so
  the coupling at head granularity is unchanged. The real RoPE is back before any
  gradient or evaluation;
- under GQA the graph maps q-channel indices onto the 3x smaller k_proj/v_proj
  (out of range), and ``BasePruner.step()`` fails when it enumerates the k_proj-rooted
  group (``imp.view(num_heads, -1)`` on 192 channels). Hence the direct use of the
  graph, the importance and ``group.prune()`` above, with the k/v items dropped.

``verify`` checks the pruned model's logits against the original with the removed
rows/columns zeroed (they must agree to float rounding).

This is the untuned recipe; its defaults stay as they are so that cached benchmark rows keep their
meaning. LLM-Pruner at its best settings (global ranking, 64+ calibration sequences, the
second-order ``param_mix`` importance, normalisation options) is ``llm_pruner.py``, whose
``ranking="block", head_reduce="mean"`` reproduces this module's pruned model (tested).

    python benchmarks/peers/torch_pruning_llm.py smollm2-135m-instruct --ratio 0.2 --out runs/tp20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorashear.errors import ConfigError

logger = logging.getLogger("benchmarks.peers.torch_pruning_llm")

REPORT_FILE = "tp_report.json"


@dataclass
class TorchPruningConfig:
    """LLM-Pruner-style settings for the Torch-Pruning baseline."""

    ratio: float = field(default=0.2, metadata={"help": "fraction of all parameters to remove (embeddings counted)"})
    layer_start: int = field(default=4, metadata={"help": "first decoder layer pruned (LLM-Pruner: 4)"})
    layer_end: int = field(default=-2, metadata={
        "help": "end of the pruned layer range, exclusive; negative counts from the end (LLM-Pruner: 30 of 32)"})
    data: str = field(default="builtin:calibration", metadata={"help": "calibration text (lorashear data spec)"})
    calib_sequences: int = field(default=8, metadata={"help": "calibration sequences for the Taylor gradients"})
    calib_batch_size: int = field(default=2, metadata={"help": "sequences per backward pass"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    round_to: int = field(default=1, metadata={"help": "keep MLP widths a multiple of this"})
    seed: int = field(default=0, metadata={"help": "packing seed (same as lorashear prune's)"})
    verify: bool = field(default=True, metadata={"help": "check logits against the zero-masked original"})

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"ratio must be in (0, 1), got {self.ratio}")
        for name in ("calib_sequences", "calib_batch_size", "seq_len", "round_to"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class LayerPlan:
    heads_per_kv_group: int  #: query heads removed from every KV group of a pruned layer
    mlp_channels: int  #: MLP channels removed from a pruned layer
    layers: list[int]
    expected_removed: int
    target_removed: int


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers


def plan_layers(model: torch.nn.Module, cfg: TorchPruningConfig) -> LayerPlan:
    """Heads per KV group and MLP channels to remove in each pruned layer to hit ``cfg.ratio``."""
    c = model.config
    n = c.num_hidden_layers
    start, end = cfg.layer_start, cfg.layer_end if cfg.layer_end > 0 else n + cfg.layer_end
    layers = list(range(max(0, start), min(n, end)))
    if not layers:
        raise ConfigError(f"no layers to prune in [{start}, {end})")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads
    slots = c.num_attention_heads // kv
    attn = _layers(model)[layers[0]].self_attn
    mlp = _layers(model)[layers[0]].mlp
    head_params = head_dim * (attn.q_proj.in_features + attn.o_proj.out_features)  # q rows + o columns
    if attn.q_proj.bias is not None:
        head_params += head_dim
    chan_params = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
    inter = mlp.gate_proj.out_features
    total = count_params(model)
    target = round(cfg.ratio * total)
    per_layer = target / len(layers)
    prunable = slots * kv * head_params + inter * chan_params  # k/v stay (shared by the KV group)
    frac = per_layer / prunable
    if frac >= 1:
        raise ConfigError(f"ratio {cfg.ratio} needs {frac:.0%} of each pruned layer's heads and MLP; "
                          "widen the layer range (--layer-start/--layer-end)")
    h = min(slots - 1, max(0, round(frac * slots)))
    rest = per_layer - h * kv * head_params
    ch = round(rest / chan_params)
    keep = inter - ch
    keep = max(cfg.round_to, round(keep / cfg.round_to) * cfg.round_to)
    ch = min(inter - cfg.round_to, max(0, inter - keep))
    expected = len(layers) * (h * kv * head_params + ch * chan_params)
    return LayerPlan(h, ch, layers, expected, target)


@contextlib.contextmanager
def rope_as_identity(model: torch.nn.Module):
    """Trace-time workaround (see module docstring): ``apply_rotary_pos_emb`` -> identity."""
    module = sys.modules[type(model).__module__]
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None:
        yield
        return
    module.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = original


def calibration_gradients(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """Accumulate d(mean LM loss)/dW over ``ids`` (N, L) into ``.grad``; returns the mean loss."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()  # no dropout; LLM-Pruner computes the loss in eval mode too
    batches = ids.split(batch_size)
    total = 0.0
    for batch in batches:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss / len(batches)
        loss.backward()
        total += float(loss.detach())
    return total


def _pruned_indices(history, name: str) -> list[int]:
    out: list[int] = []
    for layer_name, _is_out, idxs in history:
        if layer_name == name:
            out.extend(int(i) for i in idxs)
    return sorted(set(out))


def _without(group, modules: set[int]):
    """A copy of a Torch-Pruning group without the items that target ``modules`` (by id).

    Used for k_proj/v_proj under GQA: they are shared by every query head of their KV group and
    stay; Torch-Pruning's graph maps query-channel indices onto them (out of range), and its own
    ``BasePruner`` likewise empties those items before pruning.
    """
    from torch_pruning.dependency.group import Group

    out = Group()
    out._DG = group._DG
    for item in group.items:
        if id(item.dep.target.module) not in modules:
            out.items.append(item)
    return out


def rewrite_config(model: torch.nn.Module) -> dict[int, dict[str, int]]:
    """Set the model's (per-layer) config and attention attributes from its actual weight shapes."""
    from lorashear.compaction import _update_config
    from lorashear.models.adapters import LayerWidths, adapter_for

    config = model.config
    adapter = adapter_for(config)
    head_dim = adapter.head_dim
    widths = {}
    for i, layer in enumerate(_layers(model)):
        a, m = layer.self_attn, layer.mlp
        widths[i] = LayerWidths(a.q_proj.out_features // head_dim, a.k_proj.out_features // head_dim,
                                m.gate_proj.out_features)
    _update_config(model, config, adapter, widths)
    return {i: asdict(w) for i, w in widths.items()}


def prune_with_torch_pruning(model: torch.nn.Module, calib_ids: torch.Tensor,
                             cfg: TorchPruningConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Prune ``model`` in place (see the module docstring); returns it and a report."""
    import torch_pruning as tp

    t0 = time.perf_counter()
    c = model.config
    plan = plan_layers(model, cfg)
    params_before = count_params(model)
    logger.info("plan: layers %d..%d, %d query heads per KV group and %d MLP channels per layer",
                plan.layers[0], plan.layers[-1], plan.heads_per_kv_group, plan.mlp_channels)
    reference = None
    probe = calib_ids[:1, :64]
    if cfg.verify:
        import copy

        reference = copy.deepcopy(model)
    # 1. Taylor gradients on the calibration sequences
    t_grad = time.perf_counter()
    calib_loss = calibration_gradients(model, calib_ids, cfg.calib_batch_size)
    grad_s = time.perf_counter() - t_grad
    # 2. Torch-Pruning's dependency graph, Taylor importance per group, local (per-layer) selection
    layers = _layers(model)
    kv = c.num_key_value_heads
    slots = c.num_attention_heads // kv
    head_dim = layers[0].self_attn.q_proj.out_features // c.num_attention_heads
    kv_modules = {id(m) for layer in layers for m in (layer.self_attn.k_proj, layer.self_attn.v_proj)}
    importance = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    t_tp = time.perf_counter()
    with rope_as_identity(model):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=calib_ids[:1, :16],
                                                      output_transform=lambda out: out.logits)
    selected: list[tuple[torch.nn.Module, Any, list[int]]] = []
    for i in plan.layers:
        attn, mlp = layers[i].self_attn, layers[i].mlp
        if plan.mlp_channels:
            group = graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels,
                                            list(range(mlp.gate_proj.out_features)))
            imp = importance(group)  # (intermediate,): sum over gate/up rows and down columns
            selected.append((mlp.gate_proj, tp.prune_linear_out_channels,
                             sorted(imp.argsort()[: plan.mlp_channels].tolist())))
        if plan.heads_per_kv_group:
            group = graph.get_pruning_group(attn.q_proj, tp.prune_linear_out_channels,
                                            list(range(attn.q_proj.out_features)))
            imp = importance(_without(group, kv_modules))  # (heads * head_dim,): q rows + o_proj columns
            head_imp = imp.view(c.num_attention_heads, head_dim).mean(1)  # BasePruner's per-head average
            heads: list[int] = []
            for g in range(kv):  # the same number of query heads from every KV group (BasePruner's GQA branch)
                local = head_imp[g * slots:(g + 1) * slots]
                heads += (local.argsort()[: plan.heads_per_kv_group] + g * slots).tolist()
            rows = [h * head_dim + d for h in sorted(heads) for d in range(head_dim)]
            selected.append((attn.q_proj, tp.prune_linear_out_channels, rows))
    history = []
    with torch.no_grad():
        for module, fn, idxs in selected:
            group = _without(graph.get_pruning_group(module, fn, idxs), kv_modules)
            if not graph.check_pruning_group(group):
                raise ConfigError(f"torch-pruning refused a group rooted at {graph._module2name[module]}")
            for dep, dep_idxs in group:
                if isinstance(dep.target.module, torch.nn.Linear) and len(dep_idxs):
                    history.append((graph._module2name[dep.target.module],
                                    graph.is_out_channel_pruning_fn(dep.handler), list(dep_idxs)))
            group.prune()
    tp_s = time.perf_counter() - t_tp
    model.zero_grad(set_to_none=True)
    widths = rewrite_config(model)
    params_after = count_params(model)
    verify = None
    if reference is not None:
        verify = _verify(model, reference, history, probe)
        del reference
    removed = params_before - params_after
    report = {
        "method": "torch-pruning (LLM-Pruner-style: block-wise, GroupTaylorImportance, whole heads)",
        "torch_pruning_version": _version("torch-pruning"),
        "config": asdict(cfg),
        "plan": asdict(plan),
        "params": {"before": params_before, "after": params_after, "removed": removed,
                   "ratio_removed": removed / params_before, "target_ratio": cfg.ratio},
        "widths": widths,
        "calibration": {"sequences": int(calib_ids.shape[0]), "seq_len": int(calib_ids.shape[1]),
                        "tokens": int(calib_ids.numel()), "loss": calib_loss, "gradient_s": grad_s},
        "verify_max_abs_logit_diff": verify,
        "pruner_s": tp_s,
        "wall_time_s": time.perf_counter() - t0,
    }
    logger.info("removed %d of %d parameters (%.2f%%)", removed, params_before, 100 * removed / params_before)
    return model, report


@torch.no_grad()
def _verify(pruned: torch.nn.Module, reference: torch.nn.Module, history, probe: torch.Tensor) -> float:
    """Max |logit difference| between the pruned model and the original with the removed structures zeroed.

    Zeroing the output rows of q_proj/gate_proj (and their partners) is exactly what removing them does.
    """
    named = dict(reference.named_modules())
    for name, module in named.items():
        if not isinstance(module, torch.nn.Linear):
            continue
        rows = _pruned_indices([h for h in history if h[1]], name)
        cols = _pruned_indices([h for h in history if not h[1]], name)
        if rows:
            module.weight[rows] = 0
        if cols:
            module.weight[:, cols] = 0
    reference.eval()
    pruned.eval()
    a = reference(input_ids=probe).logits
    b = pruned(input_ids=probe).logits
    return float((a - b).abs().max())


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def calibration_ids(tokenizer, cfg: TorchPruningConfig) -> torch.Tensor:
    """The first ``calib_sequences`` of the packed calibration data (the same packing lorashear prune uses)."""
    from lorashear.data import load_texts, pack_texts

    return pack_texts(load_texts(cfg.data), tokenizer, cfg.seq_len, num_sequences=cfg.calib_sequences,
                      seed=cfg.seed)


def run(model_name: str, out: str | Path, cfg: TorchPruningConfig) -> dict[str, Any]:
    import lorashear

    t0 = time.perf_counter()
    model = lorashear.load_model(model_name)
    tokenizer = lorashear.load_tokenizer(model_name)
    ids = calibration_ids(tokenizer, cfg)
    model, report = prune_with_torch_pruning(model, ids, cfg)
    out = Path(out)
    lorashear.save_pretrained(model, out, tokenizer)
    report["model"] = model_name
    report["total_wall_time_s"] = time.perf_counter() - t0
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model name or directory (e.g. smollm2-135m-instruct)")
    parser.add_argument("--out", required=True, help="output directory (HF format + tp_report.json)")
    from lorashear.config import add_dataclass_arguments, dataclass_from_args

    add_dataclass_arguments(parser, TorchPruningConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = dataclass_from_args(TorchPruningConfig, args)
    report = run(args.model, args.out, cfg)
    p = report["params"]
    print(f"torch-pruning: {p['before']:,} -> {p['after']:,} parameters ({100 * p['ratio_removed']:.2f}% removed), "
          f"verify max |dlogit| {report['verify_max_abs_logit_diff']}, {report['wall_time_s']:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

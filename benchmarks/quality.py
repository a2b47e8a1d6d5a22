"""The quality benchmark (v2): lorashear against the strongest peers at equal training tokens, row by row, cached.

Every trained row is a pruned model of the reference model trained on the same data in the same order
(``builtin:calibration`` packed ``--seq-len`` tokens, seed = the row's seed) for ``--steps`` optimizer steps of
``--batch-size`` sequences (equal tokens), LoRA r=8 / alpha 16 / dropout 0.05, AdamW lr 2e-4, unless the
peer's own method retrains otherwise.

Evaluation (v2, METHOD.md section 8): perplexity on the two halves of the held-out documents of two
sources, ``--ppl-windows`` windows of ``--ppl-seq-len`` tokens spread evenly over every document of the
split, with a 95 % bootstrap interval over windows:

- ``builtin:heldout-validation`` / ``builtin:heldout-test``: Austen + Wikipedia documents held out of every
  training corpus (same sources as the training data);
- ``builtin:heldout-docs-validation`` / ``builtin:heldout-docs-test``: the Python 3.11 documentation, a domain
  no training corpus contains.

Every choice (peer settings, recipe options, ablations) reads ``validation``; the headline reads ``test``.

Rows (``ROW`` or ``PEER+RETRAIN``):

- ``dense``: the unpruned model;
- ``lorashear``, ``paper``, ``lorashear_v3``, ``lorashear-X`` (ablations): ``lorashear prune`` with that recipe
  (``LORASHEAR_ROWS``), and its knowledge analysis;
- a peer alone (one-shot, no training), or a peer with a retraining (``PEERS``, ``RETRAININGS``):
  ``llmpruner_block+lora`` is LLM-Pruner's block-wise default with LoRA (cross-entropy), ``+lora_kd`` with
  0.5 CE + 0.5 KL to the dense model.

Each finished row is saved as JSON under ``--work`` (``ROW_r20_s0_400.json``) and reused; its model is kept
under ``--models`` so ``--rescore`` can re-evaluate it (forward passes only). The report (``--out``.md/.json)
is rebuilt from whatever rows exist, so a matrix can be finished over several sessions. Every row carries a
compute column (``compute.py``: token-passes and FLOPs).

    python benchmarks/quality.py --rows dense,lorashear,llmpruner_block+lora --ratios 0.2 --seeds 0 --steps 400
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))

from lorashear.compute import Compute, forward_flops_per_token  # noqa: E402

logger = logging.getLogger("benchmarks.quality")

MODEL = "smollm2-135m-instruct"
#: source -> (validation split, test split)
EVAL_SOURCES: dict[str, tuple[str, str]] = {
    "heldout": ("builtin:heldout-validation", "builtin:heldout-test"),
    "docs": ("builtin:heldout-docs-validation", "builtin:heldout-docs-test"),
}
EVAL_SPECS = tuple(spec for pair in EVAL_SOURCES.values() for spec in pair)
PROTOCOL_VERSION = 2
#: the knowledge analyses of the reference model: the paper's magnitude proxy, and the fisher proxy of our recipe
KNOWLEDGE = HERE / "results" / "knowledge_smollm2.json"
KNOWLEDGE_FISHER = HERE / "results" / "knowledge_smollm2_fisher.json"

#: lorashear rows: PruneConfig options (flat names) on top of a recipe
LORASHEAR_ROWS: dict[str, dict[str, Any]] = {
    # LoRA dropout drawn by torch, one number per element (the default since 2026-12-06 draws the gaps between
    # dropped elements: the same distribution, other draws), as every row before then was made
    "paper": {"recipe": "paper", "knowledge": str(KNOWLEDGE), "lora_dropout_sampler": "torch"},
    # exact widths: the recipe as its rows were made before 2026-12-05 (their seeds stay comparable); the recipe's
    # default since then rounds MLP widths to 32 (row lorashear-round32); the teacher in float32 (the recipe's since
    # then: "auto", bf16 on this CPU; row lorashear-bf16teacher) and a learning rate of 2e-4 (the recipe's since then:
    # 8e-4; row lorashear-1205), and pruning ending at 30% of the steps (the recipe's since 2026-12-05 evening: 50%;
    # row lorashear-1205-long), as all its seeds were made
    "lorashear": {"recipe": "lorashear", "knowledge": str(KNOWLEDGE_FISHER), "round_to": 1,
                  "distill_teacher_dtype": "model", "lr": 2e-4, "prune_end": 0.3, "lora_dropout_sampler": "torch"},
}
#: the allocation of the recipe until 2026-12-02 evening: the same share of every unprotected layer
LORASHEAR_ROWS["lorashear_v3"] = {**LORASHEAR_ROWS["lorashear"], "allocation": "layer", "uniform_per_layer": True}
#: one ablation per component of the recipe: the component reverted to the paper's setting
ABLATIONS: dict[str, dict[str, Any]] = {
    "saliency": {"saliency": ["magnitude", "avg_magnitude", "cosine", "taylor_first", "taylor_second"]},
    "schedule": {"quota": "even", "prune_end": 0.7, "merge_at_period_end": True},
    "distill": {"distill_weight": 0.0},
    "knowledge": {"knowledge": None},
    "knowledge_proxy": {"knowledge": str(KNOWLEDGE)},
}
for _name, _opts in ABLATIONS.items():
    LORASHEAR_ROWS[f"lorashear-{_name}"] = {**LORASHEAR_ROWS["lorashear"], **_opts}
#: the recipe before 2026-12-04: the masked model trains at full width until the last step (issue 26's row a)
LORASHEAR_ROWS["lorashear-masked"] = {**LORASHEAR_ROWS["lorashear"], "compact_at": "end"}
#: the steps after pruning on the dynamic mix of paper Alg. 5 (issue 26's row c; row b is the recipe itself)
LORASHEAR_ROWS["lorashear-recover"] = {**LORASHEAR_ROWS["lorashear"], "post_pruning": "recover"}
#: a shorter pruning phase (issue 26): pruning over steps 10%..20% instead of 10%..30%, compacted at 20%
LORASHEAR_ROWS["lorashear-short"] = {**LORASHEAR_ROWS["lorashear"], "prune_end": 0.2}
#: the learning rate decayed to 0 by a cosine over the budget (both the recipe and the peer: flap+lora_cosine)
LORASHEAR_ROWS["lorashear-cosine"] = {**LORASHEAR_ROWS["lorashear"], "lr_scheduler": "cosine"}
#: higher learning rates (the recipe and the peer alike: flap+lora_lr4e-4, ...): the retrainings looked rate-limited
LEARNING_RATES = ("4e-4", "8e-4", "1.6e-3", "3.2e-3")
for _lr in LEARNING_RATES:
    LORASHEAR_ROWS[f"lorashear-lr{_lr}"] = {**LORASHEAR_ROWS["lorashear"], "lr": float(_lr)}
#: the recipe's defaults as of 2026-12-05, pinned (the headline row until the evening): MLP widths rounded to 32, the
#: teacher in bf16 where the device has it natively, learning rate 8e-4
VARIANT_BASE = "lorashear-1205"
LORASHEAR_ROWS[VARIANT_BASE] = {**LORASHEAR_ROWS["lorashear"], "round_to": 32, "distill_teacher_dtype": "auto",
                                "lr": 8e-4}
#: candidates on top of that recipe (each set against it on validation, ``lorashear-1205-*``): the teacher's KL
#: kept after pruning (the warm-up's KL was what mattered at 50%; more teacher FLOPs) and a longer pruning phase (the
#: shorter one lost); the learning-rate screen's next step stays on its own base (lorashear-lr1.6e-3)
HEADLINE_VARIANTS: dict[str, dict[str, Any]] = {
    "kdafter": {"distill_after_pruning": 0.5},
    "long": {"prune_end": 0.5},
}
for _name, _opts in HEADLINE_VARIANTS.items():
    LORASHEAR_ROWS[f"{VARIANT_BASE}-{_name}"] = {**LORASHEAR_ROWS[VARIANT_BASE], **_opts}
#: the headline row: the recipe's defaults as of 2026-12-05 evening, pinned: ``lorashear-1205`` with pruning over
#: 10%..50% of the steps, the candidate that won on validation at both ratios (adopted as the recipe's default)
HEADLINE = f"{VARIANT_BASE}-long"
#: candidates on top of the headline (each set against it on validation, ``lorashear-1205-long-*``): after the
#: compaction every weight trains instead of LoRA (LoRA merged; Minitron's rate, 1e-4), by the KL to the dense model
#: only (as Minitron retrains) or half CE, half KL (the +KD peers held the Python docs better than LoRA on plain text);
#: and the recipe's rate doubled (the best peer's at 50%)
HEADLINE_CANDIDATES: dict[str, dict[str, Any]] = {
    "fullkd": {"post_pruning": "full", "post_lr": 1e-4, "distill_after_pruning": 1.0},
    "fullmix": {"post_pruning": "full", "post_lr": 1e-4, "distill_after_pruning": 0.5},
    "lr1.6e-3": {"lr": 1.6e-3},
}
#: the headline recipe masked to the last step (issue 26's row a for today's recipe; for the wall-time pair)
HEADLINE_CANDIDATES["masked"] = {"compact_at": "end"}
#: the headline recipe with each pruning period's structures cut out as the period ends (issue 26: the smaller
#: model trains from the first period on)
HEADLINE_CANDIDATES["periodic"] = {"compact_at": "period_end", "compact_min_gain": 0.0}
#: the knowledge analysis from 4 sequences instead of 8 (half its 0.034 PF; it protects 8 of the same 12 blocks)
HEADLINE_CANDIDATES["k4"] = {"knowledge": str(HERE / "results" / "knowledge_smollm2_fisher_n4.json")}
for _name, _opts in HEADLINE_CANDIDATES.items():
    LORASHEAR_ROWS[f"{HEADLINE}-{_name}"] = {**LORASHEAR_ROWS[HEADLINE], **_opts}
#: the recipe's defaults as of 2026-12-06: the headline with LoRA dropout drawn by its gaps (models/gap_dropout.py;
#: dropout's distribution, about a fifth of a step fewer CPU seconds), cut once when pruning ends or at every period
#: end; and issue 26's row (a) with the gaps alone, to tell the two savings apart
TODAY = "lorashear-1206"
LORASHEAR_ROWS[TODAY] = {**LORASHEAR_ROWS[HEADLINE], "lora_dropout_sampler": "gaps"}
LORASHEAR_ROWS[f"{TODAY}-periodic"] = {**LORASHEAR_ROWS[TODAY], "compact_at": "period_end", "compact_min_gain": 0.5}
LORASHEAR_ROWS["lorashear-masked-gaps"] = {**LORASHEAR_ROWS["lorashear-masked"], "lora_dropout_sampler": "gaps"}
#: a cheaper teacher (issue 26): no KL, so no teacher pass, in the warm-up before the first pruning period
LORASHEAR_ROWS["lorashear-warmkd0"] = {**LORASHEAR_ROWS["lorashear"], "distill_before_pruning": 0.0}
#: ... and the teacher in bfloat16 (3.05x faster forward on this CPU, teacher_dtype.py; the KL is taken in float32)
LORASHEAR_ROWS["lorashear-cheapteacher"] = {**LORASHEAR_ROWS["lorashear-warmkd0"], "distill_teacher_dtype": "bfloat16"}
#: the teacher in bfloat16 alone (the warm-up keeps its KL)
LORASHEAR_ROWS["lorashear-bf16teacher"] = {**LORASHEAR_ROWS["lorashear"], "distill_teacher_dtype": "bfloat16"}
#: FLAP's fluctuation metric as LHSPG's data saliency (issue 24's 20 % gap; candidates, chosen on validation only)
LORASHEAR_ROWS["lorashear-fluctuation"] = {**LORASHEAR_ROWS["lorashear"], "saliency": ["fluctuation"]}
LORASHEAR_ROWS["lorashear-fisher+fluctuation"] = {**LORASHEAR_ROWS["lorashear"], "saliency": ["fisher", "fluctuation"]}
#: self-distilled chat (the dense model's own replies to chat prompts) as a share of the training rows
for _share in (10, 25):
    LORASHEAR_ROWS[f"lorashear-chat{_share}"] = {**LORASHEAR_ROWS["lorashear"], "chat_share": _share / 100}
#: serve-ready widths (issue 27): every layer's kept MLP width a multiple of 32 or 64 (q8_0 blocks, kernels)
for _m in (32, 64):
    LORASHEAR_ROWS[f"lorashear-round{_m}"] = {**LORASHEAR_ROWS["lorashear"], "round_to": _m}


@dataclass(frozen=True)
class Peer:
    """A one-shot pruner: ``module.function(model, calib_ids, config) -> (model, report)``."""

    module: str
    function: str
    config: str
    settings: dict[str, Any] = field(default_factory=dict)
    doc: str = ""
    #: settings at one ratio only (chosen on the validation split, ``peers_oneshot_smollm2.md``)
    by_ratio: dict[float, dict[str, Any]] = field(default_factory=dict)


PEERS: dict[str, Peer] = {
    "llmpruner_block": Peer("torch_pruning_llm", "prune_with_torch_pruning", "TorchPruningConfig", {"verify": False},
                            "LLM-Pruner's block-wise default: Taylor from 8 sequences, uniform in layers 4..27"),
    # the settings chosen one-shot on the validation split (benchmarks/results/peers_oneshot_smollm2.md); the
    # modules' defaults are those winners; 512 calibration sequences for the activation statistics, as screened
    "llmpruner": Peer("llm_pruner", "prune_llm_pruner", "LLMPrunerConfig", {},
                      "LLM-Pruner / Torch-Pruning at its best: per-kind global ranking of mean-normalised Taylor "
                      "importance, layers 4..27, minimum widths (peers/llm_pruner.py)",
                      by_ratio={0.2: {"attention_share": 0.0}}),
    "minitron": Peer("minitron", "prune_minitron", "MinitronConfig", {"calib_sequences": 512},
                     "Minitron width pruning: activation importance, uniform MLP width, heads kept "
                     "(peers/minitron.py)"),
    "flap": Peer("flap", "prune_flap", "FlapConfig", {"calib_sequences": 512},
                 "FLAP: fluctuation importance, standardised ranking across layers and kinds (AL-AM), bias "
                 "compensation, KV groups allowed (peers/flap.py)"),
}


@dataclass(frozen=True)
class Retraining:
    """How a peer's pruned model is retrained for the row's budget."""

    kl_weight: float  #: share of the KL to the dense teacher (0: cross-entropy only)
    full: bool = False  #: full-parameter training instead of LoRA
    doc: str = ""
    lr_scheduler: str = "constant"  #: LoRA retrainings: the learning-rate schedule (the training loop's default)
    lr: float = 2e-4  #: LoRA retrainings: the learning rate (pinned: the rate the cached peer rows were made with)


RETRAININGS: dict[str, Retraining] = {
    "lora": Retraining(0.0, doc="LoRA, cross-entropy"),
    "lora_kd": Retraining(0.5, doc="LoRA, 0.5 CE + 0.5 KL to the dense model"),
    "lora_kl": Retraining(1.0, doc="LoRA, KL to the dense model only (logit distillation)"),
    "lora_cosine": Retraining(0.0, doc="LoRA, cross-entropy, learning rate decayed to 0 by a cosine",
                              lr_scheduler="cosine"),
    **{f"lora_lr{lr}": Retraining(0.0, doc=f"LoRA, cross-entropy, learning rate {lr}", lr=float(lr))
       for lr in LEARNING_RATES},
    "kd": Retraining(1.0, full=True, doc="Minitron's retraining: every parameter, KL to the dense model only, "
                                         "AdamW 1e-4 with cosine decay after 10 warm-up steps"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="dense,llmpruner_block+lora,paper,lorashear")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ppl-seq-len", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=128, help="windows per split and source, spread evenly")
    p.add_argument("--splits", default="validation,test",
                   help="splits to score: tuning rows (--work elsewhere) score validation only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="extra option for every lorashear row (PruneConfig) or peer (its config), YAML value")
    p.add_argument("--tag", default="", help="suffix of the cached row names (with --set)")
    p.add_argument("--work", default=str(HERE / "results" / "quality" / "v2"), help="cached rows (JSON)")
    p.add_argument("--models", default=None, help="where pruned models go (default: $LORASHEAR_CACHE/quality)")
    p.add_argument("--out", default=str(HERE / "results" / "quality_smollm2"), help="report path without suffix")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--rescore", action="store_true",
                   help="re-evaluate cached rows of --rows whose model is kept (forward passes only)")
    p.add_argument("--add-recall", action="store_true",
                   help="ask the factual-recall probe of every cached row of --rows that lacks it (kept models)")
    return p.parse_args(argv)


def trained(row: str) -> bool:
    """Whether a row trains (so its step count matters): lorashear rows and peers with a retraining."""
    return row in LORASHEAR_ROWS or split_row(row)[1] is not None


def split_row(row: str) -> tuple[str, str | None]:
    """``"flap+lora"`` -> ``("flap", "lora")``; ``"lorashear"`` -> ``("lorashear", None)``."""
    base, _, retrain = row.partition("+")
    return base, retrain or None


def is_peer_row(row: str) -> bool:
    """Whether ``row`` is a peer alone or with a known retraining (``PEER`` or ``PEER+RETRAINING``)."""
    base, retrain = split_row(row)
    return base in PEERS and (retrain is None or retrain in RETRAININGS)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import yaml

        from lorashear.paths import cache_root

        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.models = Path(args.models) if args.models else cache_root() / "quality"
        self.models.mkdir(parents=True, exist_ok=True)
        self._tok = None
        self._streams: dict[str, Any] = {}
        self.extra = {}
        for item in args.set:
            key, _, value = item.partition("=")
            self.extra[key.strip()] = yaml.safe_load(value)

    @property
    def tokenizer(self):
        if self._tok is None:
            import lorashear

            self._tok = lorashear.load_tokenizer(MODEL)
        return self._tok

    def key(self, row: str, ratio: float | None, seed: int) -> str:
        if row == "dense":
            return "dense"
        steps = f"_{self.args.steps}" if trained(row) else ""
        tag = f"_{self.args.tag}" if self.args.tag else ""
        return f"{row}_r{round(100 * ratio)}_s{seed}{steps}{tag}"

    def row_file(self, key: str) -> Path:
        return self.work / f"{key}.json"

    # -- evaluation ------------------------------------------------------------------------------
    def stream(self, spec: str):
        if spec not in self._streams:
            from lorashear.evaluation.perplexity import load_eval_texts, token_stream

            self._streams[spec] = token_stream(load_eval_texts(spec), self.tokenizer)
        return self._streams[spec]

    def evaluate(self, model) -> dict[str, dict[str, Any]]:
        """Perplexity of every split of every source, with its interval and per-window NLL."""
        from lorashear.evaluation.perplexity import perplexity

        a = self.args
        wanted = {s.strip() for s in a.splits.split(",")}
        out = {}
        for spec in EVAL_SPECS:
            if spec.rsplit("-", 1)[-1] not in wanted:
                continue
            r = perplexity(model, self.stream(spec), seq_len=a.ppl_seq_len, max_windows=a.ppl_windows, source=spec,
                           batch_size=8)
            out[spec] = {"ppl": r.perplexity, "ci": [r.ci_low, r.ci_high], "nll": r.nll, "tokens": r.num_tokens,
                         "windows": r.num_windows, "stream_tokens": r.stream_tokens,
                         "window_nll": [round(x, 4) for x in r.window_nll]}
        return out

    def recall(self, model) -> dict[str, Any]:
        """The factual-recall probe of the eval report (greedy replies; correct of asked)."""
        from lorashear.evaluation.recall import recall_probe

        r = recall_probe(model, self.tokenizer)
        return {"probe": r.probe, "correct": r.num_correct, "questions": r.num_questions,
                "wrong": [x["question"] for x in r.replies if not x["correct"]]}

    def protocol(self) -> dict[str, Any]:
        a = self.args
        return {"version": PROTOCOL_VERSION, "seq_len": a.ppl_seq_len, "windows": a.ppl_windows, "spread": True,
                "splits": a.splits}

    # -- training --------------------------------------------------------------------------------
    def train_ids(self, seed: int):
        from lorashear.data import load_texts, pack_texts

        return pack_texts(load_texts("builtin:calibration"), self.tokenizer, self.args.seq_len, seed=seed)

    def retrain(self, model, seed: int, how: Retraining, compute: Compute):
        import lorashear
        from lorashear.config import config_from_dict
        from lorashear.recovery import FinetuneConfig, FinetuneResult, finetune
        from lorashear.training.losses import DistillConfig, distillation_loss, lm_loss, make_teacher

        a = self.args
        tokens = a.steps * a.batch_size * a.seq_len
        if how.full:  # Minitron's own retraining (peers/minitron.py)
            from minitron import DistillTrainConfig, distill

            dense = lorashear.load_model(MODEL)
            compute.train(tokens, forward_flops_per_token(model, a.seq_len), full=True)
            compute.teacher(tokens, forward_flops_per_token(dense, a.seq_len))
            dcfg = DistillTrainConfig(mode="full", steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                                      kl_weight=how.kl_weight, seed=seed)
            ids = self.train_ids(seed)
            t0 = time.perf_counter()
            out = distill(model, dense, ids, dcfg)
            return FinetuneResult(model=out["model"], losses=out["losses"], steps=a.steps, tokens_seen=tokens,
                                  trainable_params=out["record"]["trainable_params"],
                                  wall_time_s=time.perf_counter() - t0, sequences=len(ids))
        cfg = config_from_dict(FinetuneConfig, {"steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
                                                "seed": seed, "progress": False, "log_every": 10,
                                                "lr_scheduler": how.lr_scheduler, "lr": how.lr,
                                                # the dropout masks the peer rows were made with (torch's draws)
                                                "lora_dropout_sampler": "torch"})
        compute.train(tokens, forward_flops_per_token(model, a.seq_len))
        loss = lm_loss
        if how.kl_weight > 0:
            dense = lorashear.load_model(MODEL)
            compute.teacher(tokens, forward_flops_per_token(dense, a.seq_len))
            loss = distillation_loss(make_teacher(dense), DistillConfig(weight=how.kl_weight))
        return finetune(model, self.tokenizer, self.train_ids(seed), cfg, loss_fn=loss)

    # -- rows --------------------------------------------------------------------------------------
    def peer_row(self, base: str, retrain: str | None, ratio: float, seed: int, key: str) -> tuple[Any, dict]:
        import lorashear
        from lorashear.config import config_from_dict
        from lorashear.models.params import count_params

        peer = PEERS[base]
        module = importlib.import_module(peer.module)
        values = {**peer.settings, **peer.by_ratio.get(round(ratio, 4), {}), "ratio": ratio, "seed": seed,
                  **self.extra}
        cfg = config_from_dict(getattr(module, peer.config), values)
        model = lorashear.load_model(MODEL)
        dense_flops = forward_flops_per_token(model, self.args.seq_len)
        calib = module.calibration_ids(self.tokenizer, cfg)
        model, report = getattr(module, peer.function)(model, calib, cfg)
        compute = Compute()
        calib_rec = report.get("calibration") or {}
        fwd = calib_rec.get("forward_token_passes", int(calib.numel()))  # the block-wise peer: one Taylor pass
        bwd = calib_rec.get("backward_token_passes", int(calib.numel()))
        compute.prep(fwd, dense_flops, bwd, full_grad=True)  # gradients of every weight
        rec: dict[str, Any] = {"peer": base, "peer_settings": values, "peer_report": _slim(report),
                               "peer_prune_s": report.get("wall_time_s")}
        if retrain is not None:
            how = RETRAININGS[retrain]
            res = self.retrain(model, seed, how, compute)
            model = res.model
            rec.update(retraining=retrain, train_s=res.wall_time_s, tokens=res.tokens_seen,
                       loss_last=statistics.mean(res.losses[-3:]))
        rec.update(params=count_params(model), compute=compute.to_dict())
        return model, rec

    def lorashear_row(self, row: str, ratio: float, seed: int, key: str) -> tuple[Any, dict]:
        import lorashear
        from lorashear.config import config_from_dict
        from lorashear.stages import prune
        from lorashear.stages.prune import PruneConfig

        a = self.args
        out = self.models / key
        values = {"model": MODEL, "out": str(out), "ratio": ratio, "steps": a.steps, "batch_size": a.batch_size,
                  "seq_len": a.seq_len, "seed": seed, "progress": False, "log_every": 10,
                  **LORASHEAR_ROWS[row], **self.extra}
        values = {k: v for k, v in values.items() if v is not None}
        config = config_from_dict(PruneConfig, values)
        t0 = time.perf_counter()
        result = prune.run(config)
        wall = time.perf_counter() - t0
        model = lorashear.load_pretrained(out)
        rep = result.report
        rec = {"params": result.params_after, "ratio_removed": result.ratio_removed, "train_s": wall,
               "tokens": result.tokens_seen, "options": values, "selected_ids": rep["groups"]["selected_ids"],
               "loss_last": statistics.mean(r["loss"] for r in rep["log"][-3:]),
               "kept_per_layer": rep["kept_per_layer"], "compute": self.lorashear_compute(rep, values).to_dict()}
        return model, rec

    def lorashear_compute(self, rep: dict[str, Any], values: dict[str, Any]) -> Compute:
        """The prune stage's passes: the masked model trains at full width for every step; the teacher runs
        while the KL share is above zero; the knowledge analysis ran once before (read from its JSON)."""
        import lorashear

        a = self.args
        dense = lorashear.load_model(MODEL)
        f_dense = forward_flops_per_token(dense, a.seq_len)
        per_step = a.batch_size * a.seq_len
        if "compute" in rep:  # the prune stage counts its passes at the width of every step (since b1a2455)
            compute = Compute(**rep["compute"])
        else:  # earlier prune reports: the masked model at full width for every step
            compute = Compute()
            compute.train(rep["steps"] * per_step, f_dense)
            distill = rep["settings"]["distill"]
            if distill["weight"] > 0:
                after = distill.get("after_pruning")
                teacher_steps = rep["steps"] if after is None or after > 0 else rep["schedule"]["prune_end"]
                compute.teacher(teacher_steps * per_step, f_dense)
        if values.get("knowledge"):
            add_knowledge_passes(compute, values["knowledge"], dense)
        return compute

    def run_row(self, row: str, ratio: float, seed: int) -> dict[str, Any]:
        import lorashear
        from lorashear.models.params import count_params

        a = self.args
        key = self.key(row, ratio, seed)
        t0 = time.perf_counter()
        base, retrain = split_row(row)
        if row == "dense":
            model = lorashear.load_model(MODEL)
            rec: dict[str, Any] = {"params": count_params(model), "compute": Compute().to_dict()}
        elif is_peer_row(row):
            model, rec = self.peer_row(base, retrain, ratio, seed, key)
            lorashear.save_pretrained(model, self.models / key, self.tokenizer)
        elif row in LORASHEAR_ROWS:
            model, rec = self.lorashear_row(row, ratio, seed, key)
        else:
            raise SystemExit(f"unknown row {row!r}; rows: dense, {', '.join(LORASHEAR_ROWS)}, a peer "
                             f"({', '.join(PEERS)}) alone or +{'/+'.join(RETRAININGS)}")
        rec["ppl"] = self.evaluate(model)
        rec["recall"] = self.recall(model)
        rec.update(row=row, ratio=ratio, seed=seed, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                   wall_s=time.perf_counter() - t0, extra=self.extra, tag=a.tag, protocol=self.protocol(),
                   machine=machine(), threads=a.threads, command=shlex.join([Path(sys.executable).name, *sys.argv]))
        return rec

    def rescore(self, key: str, *, recall_only: bool = False) -> bool:
        import lorashear

        path = self.row_file(key)
        rec = json.loads(path.read_text())
        if recall_only and rec.get("recall"):
            return False
        model_dir = self.models / key
        if key != "dense" and not (model_dir / "config.json").is_file():
            logger.warning("%s: no kept model in %s; cannot rescore", key, model_dir)
            return False
        model = lorashear.load_model(MODEL) if key == "dense" else lorashear.load_pretrained(model_dir)
        if not recall_only:
            rec["ppl"] = self.evaluate(model)
            rec["protocol"] = self.protocol()
        rec["recall"] = self.recall(model)
        logger.info("%s: recall %d / %d", key, rec["recall"]["correct"], rec["recall"]["questions"])
        path.write_text(json.dumps(rec, indent=1) + "\n")
        return True


def _slim(report: dict[str, Any]) -> dict[str, Any]:
    """A peer's report without bulky fields."""
    return {k: v for k, v in report.items() if k not in ("widths", "history", "scores")}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


# -- report ----------------------------------------------------------------------------------------
def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _summarise(items: list[dict]) -> dict[str, Any]:
    entry: dict[str, Any] = {"seeds": sorted(i["seed"] for i in items), "params": items[0]["params"], "ppl": {}}
    for spec in EVAL_SPECS:
        by_seed = {i["seed"]: i["ppl"][spec]["ppl"] for i in items if spec in i.get("ppl", {})}
        vals = list(by_seed.values())
        entry["ppl"][spec] = {
            "mean": statistics.mean(vals) if vals else None, "values": vals, "by_seed": by_seed,
            "half_range": (max(vals) - min(vals)) / 2 if len(vals) > 1 else None,
            "ci_by_seed": {i["seed"]: i["ppl"][spec]["ci"] for i in items if spec in i.get("ppl", {})},
            # per-window NLL sums and tokens per window, for paired intervals (left out of the JSON summary)
            "_windows": {i["seed"]: (i["ppl"][spec]["window_nll"], i["ppl"][spec]["tokens"] / i["ppl"][spec]["windows"])
                         for i in items if "window_nll" in i.get("ppl", {}).get(spec, {})}}
    flops = [i["compute"]["flops"] for i in items if i.get("compute")]
    entry["pflops"] = statistics.mean(flops) / 1e15 if flops else None
    recalls = [i["recall"]["correct"] for i in items if i.get("recall")]
    entry["recall"] = statistics.mean(recalls) if recalls else None
    entry["recall_of"] = next((i["recall"]["questions"] for i in items if i.get("recall")), None)
    walls = [i["wall_s"] for i in items if i.get("wall_s")]
    entry["wall_min"] = statistics.mean(walls) / 60 if walls else None
    entry["compute"] = items[0].get("compute")
    return entry


def _recall_cell(e: dict[str, Any]) -> str:
    if e.get("recall") is None:
        return "—"
    return f"{e['recall']:.1f} / {e['recall_of']}".replace(".0 /", " /")


def _cell(e: dict[str, Any], spec: str) -> str:
    p = e["ppl"][spec]
    if p["mean"] is None:
        return "—"
    return fmt(p["mean"]) + (f" ± {p['half_range']:.2f}" if p["half_range"] is not None else "")


def summarise(work: Path) -> list[dict[str, Any]]:
    rows = [json.loads(p.read_text()) for p in sorted(work.glob("*.json"))]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["row"], r.get("ratio") if r["row"] != "dense" else None,
               r.get("steps") if trained(r["row"]) else None, r.get("tag") or "",
               json.dumps(r.get("extra", {}), sort_keys=True))
        groups.setdefault(key, []).append(r)
    out = []
    for (row, ratio, steps, tag, extra), items in groups.items():
        out.append({"row": row, "ratio": ratio, "steps": steps, "tag": tag, "extra": json.loads(extra),
                    **_summarise(items)})
    out.sort(key=lambda e: (e["ratio"] or 0, e["steps"] or 0, e["row"], e["tag"]))
    return out


def add_knowledge_passes(compute: Compute, knowledge: str | Path, dense: Any) -> None:
    """Count the knowledge analysis ``knowledge`` (its JSON) ran before pruning as preparation passes of ``dense``."""
    k = json.loads(Path(knowledge).read_text())
    kc = k["config"]
    f_k = forward_flops_per_token(dense, kc["seq_len"])
    tokens = kc["num_sequences"] * kc["seq_len"]
    bwd = tokens if kc.get("proxy") == "fisher" else 0  # the fisher proxy's one gradient pass
    compute.prep(k["forward_passes"] * tokens + bwd, f_k, bwd)


def write_report(work: Path, out: Path) -> None:
    summary = summarise(work)
    val = [EVAL_SOURCES[s][0] for s in EVAL_SOURCES]
    test = [EVAL_SOURCES[s][1] for s in EVAL_SOURCES]
    lines = ["| row | ratio | steps | tag | seeds | params | " + " | ".join(f"**test** `{s}`" for s in test) + " | "
             + " | ".join(f"validation `{s}`" for s in val) + " | recall | PFLOPs | wall (min) |",
             "|---|---|---|---|---|---:|" + "---:|" * (len(test) + len(val)) + "---:|---:|---:|"]
    for e in summary:
        ratio_s = "—" if e["ratio"] is None else f"{e['ratio']:.0%}"
        lines.append(f"| {e['row']} | {ratio_s} | {e['steps'] or '—'} | {e['tag']} | "
                     f"{','.join(map(str, e['seeds']))} | {e['params']:,} | "
                     + " | ".join(_cell(e, s) for s in test + val)
                     + f" | {_recall_cell(e)}"
                     + f" | {fmt(e['pflops']) if e['pflops'] is not None else '—'} | {fmt(e['wall_min'])} |")
    seed_lines = ["\nEvery seed with its 95 % bootstrap interval over windows (test split):\n",
                  "| row | ratio | steps | tag | seed | " + " | ".join(f"`{s}`" for s in test) + " |",
                  "|---|---|---|---|---|" + "---|" * len(test)]
    for e in summary:
        for seed in e["seeds"]:
            cells = []
            for s in test:
                v = e["ppl"][s]["by_seed"].get(seed)
                ci = e["ppl"][s]["ci_by_seed"].get(seed) or [None, None]
                cells.append("—" if v is None else f"{v:.2f} [{fmt(ci[0])}, {fmt(ci[1])}]")
            ratio_s = "—" if e["ratio"] is None else f"{e['ratio']:.0%}"
            seed_lines.append(f"| {e['row']} | {ratio_s} | {e['steps'] or '—'} | {e['tag']} | {seed} | "
                              + " | ".join(cells) + " |")
    public = [{**e, "ppl": {k: {f: v for f, v in p.items() if not f.startswith("_")} for k, p in e["ppl"].items()}}
              for e in summary]
    out.with_suffix(".json").write_text(json.dumps(public, indent=1) + "\n")
    table = (matrix_table(summary, STRONG_PEERS_MATRIX, "Issue 24's matrix")
             + matrix_table(summary, COMPACTION_MATRIX, "Issue 26's matrix")
             + "\n" + "\n".join(lines) + "\n" + "\n".join(seed_lines) + "\n"
             + margin_table(summary)
             + margin_table(summary, ours="lorashear-round32")
             + margin_table(summary, ours=VARIANT_BASE)
             + margin_table(summary, ours=HEADLINE)
             + margin_table(summary, ours=HEADLINE, matched=True)
             + variant_table(summary)
             + variant_table(summary, base=VARIANT_BASE)
             + variant_table(summary, base=HEADLINE))
    replace_table(out.with_suffix(".md"), table, "# Quality benchmark (v2)")
    print(table)


def _plain_rows(summary: list[dict]) -> dict[tuple, dict]:
    """The summary's rows with no tag and no extras, by (row, ratio, steps): the rows the tables compare."""
    return {(e["row"], e["ratio"], e["steps"]): e for e in summary if not e["extra"] and not e["tag"]}


def margin_table(summary: list[dict], ours: str = "lorashear", split: int = 1, matched: bool = False) -> str:
    """How far ``ours`` is below every trained peer row at every ratio and step count both ran (no tag, no
    extras), on the test split (``split=1``) of each source.

    The margin is the difference of the means; it is set against the two rows' half-ranges added (the seed
    spread), and the paired differences (peer - ours) are listed for the seeds both rows ran. ``matched``: the
    peer rows given more steps than ``ours`` instead (the compute-matched peers, ``--steps`` chosen so that their
    FLOPs equal ours), with both rows' FLOPs.
    """
    plain = _plain_rows(summary)
    lines = []
    for (row, ratio, steps), mine in sorted(plain.items(), key=lambda kv: (kv[0][1] or 0, kv[0][2] or 0)):
        if row != ours:
            continue
        for (peer, p_ratio, p_steps), other in sorted(plain.items(), key=lambda kv: kv[0][0]):
            more_steps = p_steps is not None and steps is not None and p_steps > steps
            if "+" not in peer or p_ratio != ratio or (not more_steps if matched else p_steps != steps):
                continue
            for source, specs in EVAL_SOURCES.items():
                s = specs[split]
                a, b = mine["ppl"][s], other["ppl"][s]
                if a["mean"] is None or b["mean"] is None:
                    continue
                margin = b["mean"] - a["mean"]
                spread = (a["half_range"] or 0.0) + (b["half_range"] or 0.0)
                times = f"{margin / spread:.1f}x" if spread > 0 else "—"
                paired = [f"{seed}: {b['by_seed'][seed] - v:+.2f}{_paired_ci(a, b, seed)}"
                          for seed, v in sorted(a["by_seed"].items()) if seed in b["by_seed"]]
                steps_cell = (f"{steps} / {p_steps} (PF {mine['pflops']:.3f} / {other['pflops']:.3f})"
                              if matched else f"{steps}")
                lines.append(f"| {ratio:.0%} | {steps_cell} | {peer} | {s} "
                             f"| {','.join(map(str, sorted(a['by_seed'])))} "
                             f"/ {','.join(map(str, sorted(b['by_seed'])))} | {margin:+.2f} | {spread:.2f} | {times} "
                             f"| {'; '.join(paired)} |")
    if not lines:
        return ""
    what = " against the peers given more steps (compute-matched where the FLOPs agree; both shown)" if matched else ""
    head = [f"\nMargins of `{ours}`{what} on the test split (peer mean - ours; positive: ours is lower; spread: the "
            "two half-ranges added; paired: peer - ours in each seed both ran, with a 95 % bootstrap interval over "
            "the same windows resampled in pairs):\n",
            f"| ratio | {'steps (ours / peer)' if matched else 'steps'} | peer | source | seeds (ours / peer) "
            "| margin | spread | margin / spread | paired [95 % interval over windows] |",
            "|---|---|---|---|---|---:|---:|---:|---|"]
    return "\n".join(head + lines) + "\n"


@dataclass(frozen=True)
class Asked:
    """One line of an issue's matrix: the row and its step count at each ratio, and the seeds asked for."""

    what: str
    rows: dict[float, tuple[str, int]]  #: ratio -> (row, steps)
    seeds: dict[float, int]  #: ratio -> seeds asked for


#: issue 24's matrix: 3 seeds for lorashear and the best peer at 20%, 2 elsewhere; every peer at its best learning rate
#: on validation (LoRA: FLAP 8e-4 at 20% and 50%; LLM-Pruner 8e-4 at 20%, 1.6e-3 at 50%); the best peer at each ratio
#: is the one ahead on validation (FLAP + LoRA at 20%, LLM-Pruner + LoRA at 50%)
#: Compute-matched step counts from the rows' compute columns: FLAP at 20% 2.28e11 FLOPs a step, 565 steps = 0.165 PF;
#: LLM-Pruner at 50% 1.43e11 a step plus 1.34e13 of calibration, 944 steps = 0.148 PF (a row at 1321 steps, from a
#: wrong per-step estimate, spends 0.202 PF: more than matched, kept and labelled by its FLOPs)
BEST_PEER = {0.2: "flap+lora_lr8e-4", 0.5: "llmpruner+lora_lr1.6e-3"}
STRONG_PEERS_MATRIX: tuple[Asked, ...] = (
    Asked("lorashear (the recipe `lorashear run` ships)", {0.2: (HEADLINE, 400), 0.5: (HEADLINE, 400)},
          {0.2: 3, 0.5: 2}),
    Asked("the paper's recipe", {0.2: ("paper", 400), 0.5: ("paper", 400)}, {0.2: 2, 0.5: 2}),
    Asked("FLAP + LoRA at its best rate (the best peer at 20%)",
          {0.2: ("flap+lora_lr8e-4", 400), 0.5: ("flap+lora_lr8e-4", 400)}, {0.2: 3, 0.5: 2}),
    Asked("LLM-Pruner at its best + LoRA at its best rate (the best peer at 50%)",
          {0.2: ("llmpruner+lora_lr8e-4", 400), 0.5: ("llmpruner+lora_lr1.6e-3", 400)}, {0.2: 2, 0.5: 2}),
    Asked("Minitron + its own retraining (logit distillation)",
          {0.2: ("minitron+kd", 400), 0.5: ("minitron+kd", 400)}, {0.2: 2, 0.5: 2}),
    Asked("the best peer with the other retraining (logit distillation)",
          {0.2: ("flap+kd", 400), 0.5: ("llmpruner+kd", 400)}, {0.2: 2, 0.5: 2}),
    Asked("the best peer, compute-matched (more steps, the FLOPs of lorashear)",
          {0.2: (BEST_PEER[0.2], 565), 0.5: (BEST_PEER[0.5], 944)}, {0.2: 2, 0.5: 2}),
)
#: issue 26's matrix (two seeds each): the recipe of its time (exact widths, 2e-4, pruning over 10%..30%) masked to
#: the last step (a), compacted when pruning ends and trained on (b), then the dynamic recovery mix (c)
COMPACTION_MATRIX: tuple[Asked, ...] = tuple(
    Asked(what, {0.2: (row, 400), 0.5: (row, 400)}, {0.2: 2, 0.5: 2})
    for what, row in (("(a) masked to the last step", "lorashear-masked"),
                      ("(b) compacted when pruning ends, trained on", "lorashear"),
                      ("(c) compacted, then the dynamic recovery mix", "lorashear-recover"))
) + (Asked("the best peer (FLAP + LoRA at 20%, LLM-Pruner + LoRA at 50%)",
          {r: (row, 400) for r, row in BEST_PEER.items()}, {0.2: 2, 0.5: 2}),)


def matrix_table(summary: list[dict], matrix: tuple[Asked, ...], title: str) -> str:
    """Which seeds of a matrix (``title``) are run: every asked row at every ratio, its seeds run against those
    asked for (rows with no tag and no extras)."""
    plain = _plain_rows(summary)
    ratios = sorted({r for asked in matrix for r in asked.rows})
    lines = [f"\n{title}: seeds run / asked\n",
             "| what | " + " | ".join(f"{r:.0%}: row (steps) | seeds" for r in ratios) + " |",
             "|---|" + "---|---|" * len(ratios)]
    missing = 0
    for asked in matrix:
        cells = []
        for r in ratios:
            row, steps = asked.rows[r]
            done = plain.get((row, r, steps), {}).get("seeds", [])
            missing += max(asked.seeds[r] - len(done), 0)
            mark = "" if len(done) >= asked.seeds[r] else " (missing)"
            cells.append(f"`{row}` ({steps}) | {len(done)} / {asked.seeds[r]}{mark}")
        lines.append(f"| {asked.what} | " + " | ".join(cells) + " |")
    lines.append(f"\nSeeds still missing: {missing}.")
    return "\n".join(lines) + "\n"


def _variant_of(row: str) -> str:
    """The row a recipe row is a variant of: ``lorashear-1205-long-*`` of the headline, ``lorashear-1205-*`` (the
    headline among them) of ``lorashear-1205``, every other one of ``lorashear``."""
    if row.startswith(f"{HEADLINE}-"):
        return HEADLINE
    return VARIANT_BASE if row.startswith(f"{VARIANT_BASE}-") else "lorashear"


def variant_table(summary: list[dict], base: str = "lorashear", split: int = 0) -> str:
    """Every variant of ``base`` (of ``lorashear``: ``paper`` and ``lorashear-*``, ``lorashear-1205`` among them; of
    ``lorashear-1205``: ``lorashear-1205-*``, the headline among them) against it at the same ratio and step count,
    on the validation split (``split=0``) where recipe choices are made: the difference of the means (variant - base;
    negative: the variant is lower), the seed spread, and the paired differences per seed."""
    plain = _plain_rows(summary)
    lines = []
    for (row, ratio, steps), variant in sorted(plain.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        if (row == base or row not in LORASHEAR_ROWS or _variant_of(row) != base
                or (base, ratio, steps) not in plain):
            continue
        ref = plain[(base, ratio, steps)]
        for source, specs in EVAL_SOURCES.items():
            s = specs[split]
            a, b = ref["ppl"][s], variant["ppl"][s]
            seeds = sorted(set(a["by_seed"]) & set(b["by_seed"]))
            if not seeds:
                continue
            # both rows over the seeds both ran, so a third seed of one row does not move the comparison
            va, vb = [a["by_seed"][x] for x in seeds], [b["by_seed"][x] for x in seeds]
            diff = statistics.mean(vb) - statistics.mean(va)
            spread = (max(va) - min(va) + max(vb) - min(vb)) / 2
            paired = [f"{x}: {b['by_seed'][x] - a['by_seed'][x]:+.2f}{_paired_ci(a, b, x)}" for x in seeds]
            within = "—" if len(seeds) < 2 else ("yes" if abs(diff) <= spread else "no")
            lines.append(f"| {ratio:.0%} | {steps} | {row} | {s} | {','.join(map(str, seeds))} | "
                         f"{statistics.mean(vb):.2f} | {statistics.mean(va):.2f} | {diff:+.2f} | {spread:.2f} | "
                         f"{within} | {'; '.join(paired)} |")
    if not lines:
        return ""
    head = [f"\nVariants of `{base}` on the validation split, where recipe choices are made, over the seeds both "
            f"rows ran (variant - {base}; negative: the variant is lower; spread: the two half-ranges added; paired: "
            "variant - base in each seed, with a 95 % bootstrap interval over the same windows):\n",
            f"| ratio | steps | variant | source | seeds | variant | {base} | difference | spread | within spread "
            "| paired [95 % interval over windows] |",
            "|---|---|---|---|---|---:|---:|---:|---:|---|---|"]
    return "\n".join(head + lines) + "\n"


def _paired_ci(a: dict[str, Any], b: dict[str, Any], seed: Any) -> str:
    """`` [lo, hi]``: the 95 % interval of (peer - ours) perplexity on the same windows, resampled in pairs
    (empty when either row lacks its per-window NLLs)."""
    from lorashear.evaluation.perplexity import paired_window_interval

    wa, wb = a.get("_windows", {}).get(seed), b.get("_windows", {}).get(seed)
    if not wa or not wb or len(wa[0]) != len(wb[0]) or wa[1] != wb[1]:
        return ""
    _, lo, hi = paired_window_interval(wa[0], wb[0], [wa[1]] * len(wa[0]))
    return f" [{lo:+.2f}, {hi:+.2f}]"


def replace_table(md: Path, table: str, title: str) -> None:
    """Write ``table`` below the ``<!-- table -->`` marker of ``md``, keeping the hand-written text above it."""
    head = md.read_text().split("<!-- table -->")[0] if md.is_file() else title + "\n\n"
    md.write_text(head.rstrip() + "\n\n<!-- table -->\n" + table)


def expand(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    jobs = []
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if row == "dense":
            jobs.append((row, 0.0, 0))
            continue
        for ratio in [float(x) for x in args.ratios.split(",")]:
            for seed in [int(x) for x in args.seeds.split(",")]:
                jobs.append((row, ratio, seed))
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("LORASHEAR_DISABLE_PROGRESS", "1")
    import torch

    torch.set_num_threads(args.threads)
    bench = Bench(args)
    if not args.report_only:
        for row, ratio, seed in expand(args):
            key = bench.key(row, ratio, seed)
            if bench.row_file(key).is_file():
                if args.rescore or args.add_recall:
                    logger.info("%s: rescoring", key)
                    bench.rescore(key, recall_only=not args.rescore)
                else:
                    logger.info("%s: cached", key)
                continue
            if args.rescore or args.add_recall:
                continue
            logger.info("%s: running", key)
            rec = bench.run_row(row, ratio, seed)
            bench.row_file(key).write_text(json.dumps(rec, indent=1) + "\n")
            logger.info("%s: %s", key, {s: round(v["ppl"], 3) for s, v in rec["ppl"].items()})
    write_report(Path(args.work), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

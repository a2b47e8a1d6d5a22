"""The prune stage end to end (the 2-process accelerate test takes ~25 s on 2 cores) on tiny random Llamas: selected groups zero, ratio, compaction, resume, DDP, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_lhspg import base_param_count, lhspg_run, random_batches, tiny_lora_model
from tiny_models import plain_tiny_llama

from lorashear.lhspg import LHSPGConfig, TargetConfig
from lorashear.models.lora import LoraSettings
from lorashear.stages import prune as prune_stage
from lorashear.stages.prune import PruneConfig
from lorashear.training import TrainConfig


def test_run_prune_zeroes_selected_groups_hits_ratio_and_compacts_exactly(tmp_path):
    model = plain_tiny_llama()
    data = random_batches(n=16, seq=16)
    out = tmp_path / "p"
    cfg = PruneConfig(model="", out=str(out), lhspg=LHSPGConfig(num_periods=2, warmup_steps=2, period_steps=3),
                      lora=LoraSettings(r=4, alpha=8, dropout=0.0), unprunable=("0:attention",),
                      target=TargetConfig(ratio=0.1), train=TrainConfig(steps=10, batch_size=2, progress=False,
                                                                        lr=1e-2))
    result = prune_stage.run(cfg, model=model, data=data)
    report = result.report
    p = report["params"]
    saved = json.loads((out / "prune_result.json").read_text())
    assert saved["params_after"] == p["after"] == result.params_after
    assert saved["ratio_removed"] == pytest.approx(p["ratio_removed"])
    assert json.loads((out / "prune_report.json").read_text())["settings"]["lora"]["r"] == 4
    assert abs(p["ratio_removed"] - 0.1) <= 0.005
    assert p["after"] == p["before"] - p["removed"]
    assert report["groups"]["max_abs_selected"] == 0.0
    assert report["verify"]["compacted_vs_masked_max_abs_logit_diff"] < 1e-5
    assert report["groups"]["selected"] == sum(report["plan"]["counts"].values())
    assert report["kept_per_layer"]["attention_head"]["0"]["kept"] == 2  # layer 0 attention unprunable
    assert (out / "prune.png").stat().st_size > 1000
    assert not (out / "checkpoints").exists()
    from lorashear.models.loading import load_pretrained

    reloaded = load_pretrained(out)
    assert sum(p.numel() for p in reloaded.parameters()) == p["after"]
    assert len(report["log"]) == 10 and report["log"][-1]["group_sparsity"] > 0


def test_masked_equals_compacted_logits_after_training():
    from lorashear.compaction import compact

    model, graph, _, res = lhspg_run(0.15, TrainConfig(steps=8, batch_size=2, progress=False, lr=1e-2),
                                     LHSPGConfig(warmup_steps=1, num_periods=2, period_steps=3), seed=7,
                                     dropout=0.05, data=random_batches(n=8, seq=16))
    selected = res.lhspg.committed_groups
    named = dict(model.named_parameters())
    for g in graph.groups:  # exactly the selected groups are zero
        norm = sum(float(named[s.name].detach().index_select(s.dim, s.index_tensor()).abs().sum())
                   for s in g.slices if "lora_" not in s.name)
        assert (norm == 0.0) == (g in selected), g
    ids = random_batches(n=2, seq=12, seed=3)
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        small = compact(model, selected, merge_lora=True)
        assert torch.allclose(small(input_ids=ids).logits, masked, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < base_param_count(tiny_lora_model(seed=7))


def _run(tmp_path, stop_after=None, resume=False):
    model, _, _, res = lhspg_run(
        0.12, TrainConfig(steps=12, batch_size=2, grad_accum=2, progress=False, lr=5e-3, checkpoint_every=3,
                          lr_scheduler="cosine", lr_warmup_steps=2),
        LHSPGConfig(warmup_steps=2, num_periods=2, period_steps=4),
        checkpoint_dir=tmp_path / "ckpt", resume=resume, stop_after=stop_after)
    return model, res


def test_resume_after_kill_mid_period_is_bit_identical(tmp_path):
    ref, ref_res = _run(tmp_path / "a")
    # killed after step 5 (period 0, t = 3); last checkpoint at step 3 (period 0, t = 0 done)
    _, stopped = _run(tmp_path / "b", stop_after=5)
    assert stopped.stopped_early and stopped.steps_done == 5
    resumed, res = _run(tmp_path / "b", resume=True)
    assert res.resumed_from == 3 and res.steps_done == 12
    ref_state = dict(ref.named_parameters())
    got = dict(resumed.named_parameters())
    assert ref_state.keys() == got.keys()
    for name, value in ref_state.items():
        assert torch.equal(value, got[name]), name
    assert [g.id for g in ref_res.lhspg.committed_groups] == [g.id for g in res.lhspg.committed_groups]
    assert [r["loss"] for r in ref_res.log] == [r["loss"] for r in res.log]


def _tiny_dir(tmp_path: Path) -> Path:
    from lorashear.models.loading import load_tokenizer

    try:
        tok = load_tokenizer("smollm2-135m-instruct")
    except Exception as exc:  # pragma: no cover - the reference model is set up by scripts/setup.sh
        pytest.skip(f"reference tokenizer unavailable: {exc}")
    model = plain_tiny_llama(vocab=len(tok))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


CLI_ARGS = ["--ratio", "0.005", "--steps", "6", "--num-periods", "2", "--seq-len", "32", "--num-sequences", "8",
            "--batch-size", "2", "--checkpoint-every", "3", "--lora-r", "4"]


def test_cli_prune(tmp_path):
    from lorashear.cli import main

    src = _tiny_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["-q", "prune", str(src), "--out", str(out), *CLI_ARGS, "--unprunable", "1:mlp"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["params"]["after"] < report["params"]["before"]
    assert abs(report["params"]["ratio_removed"] - 0.005) <= 0.005
    assert report["kept_per_layer"]["mlp_channel"]["1"]["kept"] == 64
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert main(["prune", str(src), "--out", str(out)]) == 2  # no target -> one-line error


def test_accelerate_launch_two_processes_cpu(tmp_path):
    src = _tiny_dir(tmp_path)
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lorashear", "-q", "prune", str(src),
           "--out", str(out), *CLI_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "prune_report.json").read_text())
    assert report["world_size"] == 2
    assert report["tokens_seen"] == 6 * 2 * 2 * 32
    assert report["verify"]["compacted_vs_masked_max_abs_logit_diff"] < 1e-5
    from lorashear.models.loading import load_pretrained

    assert sum(p.numel() for p in load_pretrained(out).parameters()) == report["params"]["after"]


# -- resume safety ------------------------------------------------------------------------------------
def _stage_cfg(out, ratio=0.1, **kw):
    values = {"model": "", "out": str(out), "ratio": ratio, "steps": 10, "batch_size": 2, "lr": 1e-2,
              "num_periods": 2, "warmup_steps": 2, "period_steps": 3, "lora_r": 4, "lora_alpha": 8,
              "lora_dropout": 0.0, "checkpoint_every": 2, "progress": False, **kw}
    from lorashear.config import config_from_dict

    return config_from_dict(PruneConfig, values)


def test_a_mismatched_resume_is_refused_and_force_starts_over(tmp_path):
    from lorashear.errors import CheckpointError

    data = random_batches(n=16, seq=16)
    out = tmp_path / "p"
    model = lambda: plain_tiny_llama(train=False)  # noqa: E731
    assert prune_stage.run(_stage_cfg(out), model=model(), data=data, stop_after=5) is None
    with pytest.raises(CheckpointError, match="ratio"):  # another target ratio
        prune_stage.run(_stage_cfg(out, ratio=0.2, resume=True), model=model(), data=data)
    with pytest.raises(CheckpointError, match="steps"):  # another budget
        prune_stage.run(_stage_cfg(out, steps=12, resume=True), model=model(), data=data)
    with pytest.raises(CheckpointError, match="earlier run"):  # a fresh run never reuses or deletes them
        prune_stage.run(_stage_cfg(out), model=model(), data=data)
    assert (out / "checkpoints").is_dir()
    resumed = prune_stage.run(_stage_cfg(out, resume=True), model=model(), data=data)
    fresh = prune_stage.run(_stage_cfg(tmp_path / "q"), model=model(), data=data)
    assert resumed.report["groups"]["selected_ids"] == fresh.report["groups"]["selected_ids"]
    assert resumed.report["resumed_from"] == 4
    assert prune_stage.run(_stage_cfg(tmp_path / "q", ratio=0.2, force=True), model=model(), data=data) is not None


def test_a_crafted_pickle_in_a_checkpoint_is_never_loaded(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    data = random_batches(n=16, seq=16)
    out = tmp_path / "p"
    model = lambda: plain_tiny_llama(train=False)  # noqa: E731
    prune_stage.run(_stage_cfg(out), model=model(), data=data, stop_after=5)
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    for name in ("lhspg.pt", "scheduler.pt", "rng_0.pt", "optimizer.pt"):
        (ckpt / name).write_bytes(pickle.dumps(Exploit()))
    result = prune_stage.run(_stage_cfg(out, resume=True), model=model(), data=data)
    assert result is not None and result.report["resumed_from"] == 4
    assert not marker.exists()
    sources = list(Path(__file__).parent.parent.joinpath("src", "lorashear").rglob("*.py"))
    assert sources and all("torch.load(" not in p.read_text() and "import pickle" not in p.read_text() for p in sources)


def test_the_kl_share_switches_when_pruning_ends(tmp_path):
    data = random_batches(n=16, seq=16)
    cfg = _stage_cfg(tmp_path / "p", distill_weight=0.5, distill_after_pruning=0.0, checkpoint_every=0)
    result = prune_stage.run(cfg, model=plain_tiny_llama(), data=data)
    end = result.report["schedule"]["prune_end"]
    shares = {r["step"]: r["kl_share"] for r in result.report["log"]}
    assert 0 < end < 10 and sorted(shares) == list(range(1, 11))
    assert all(v == (0.5 if step <= end else 0.0) for step, v in shares.items())  # log step k = step index k - 1
    from lorashear.config import config_from_dict
    from lorashear.errors import ConfigError
    from lorashear.stages.recover import RecoverConfig

    with pytest.raises(ConfigError, match="prune stage only"):
        config_from_dict(RecoverConfig, {"model": "m", "teacher": "t", "out": "o", "distill_after_pruning": 0.0})
    with pytest.raises(ConfigError, match="prune stage only"):
        config_from_dict(RecoverConfig, {"model": "m", "teacher": "t", "out": "o", "distill_before_pruning": 0.0})
    with pytest.raises(ConfigError, match="prune stage only"):
        config_from_dict(RecoverConfig, {"model": "m", "teacher": "t", "out": "o", "distill_teacher_dtype": "auto"})


def test_no_teacher_in_the_warm_up_when_its_share_is_zero(tmp_path):
    """--distill-before-pruning 0: cross-entropy only (no teacher pass) until the first pruning period, the KL
    while pruning, and the compute column counts the teacher's passes of the pruning periods only."""
    data = random_batches(n=16, seq=16)
    cfg = _stage_cfg(tmp_path / "p", distill_weight=0.5, distill_after_pruning=0.0, distill_before_pruning=0.0,
                     checkpoint_every=0)
    result = prune_stage.run(cfg, model=plain_tiny_llama(), data=data)
    sched = result.report["schedule"]
    start, end = sched["warmup_steps"], sched["prune_end"]
    log = result.report["log"]
    assert 0 < start < end < 10
    for r in log:  # log step k = step index k - 1
        during = start < r["step"] <= end
        assert r["kl_share"] == (0.5 if during else 0.0) and ("kl" in r) == during
    per_step = cfg.train.batch_size * cfg.train.grad_accum * data.shape[1]
    assert result.report["compute"]["teacher_fwd"] == (end - start) * per_step


def test_a_bfloat16_teacher_distils_in_float32_within_its_rounding(tmp_path):
    """--distill-teacher-dtype bfloat16: the teacher's weights are bf16 (the student's stay fp32); the loss it
    gives is the fp32 teacher's within bf16 rounding, and a prune run with it trains and prunes exactly."""
    from lorashear.training.losses import DistillConfig, distillation_loss, make_teacher, teacher_dtype

    dense = plain_tiny_llama()
    t16, t32 = make_teacher(dense, "bfloat16"), make_teacher(dense)
    assert {p.dtype for p in t16.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in t16.parameters())
    assert {p.dtype for p in dense.parameters()} == {torch.float32}
    student = tiny_lora_model(seed=3, random_b=True)
    batch = random_batches(n=2, seq=12)
    with torch.no_grad():
        l16 = float(distillation_loss(t16, DistillConfig(weight=1.0))(student, batch))
        l32 = float(distillation_loss(t32, DistillConfig(weight=1.0))(student, batch))
    assert l32 > 1e-4 and l16 == pytest.approx(l32, rel=0.05, abs=2e-3)
    assert teacher_dtype(dense.to(torch.bfloat16), "auto") is None  # never changes a half-precision model
    assert teacher_dtype(dense, "model") is None and teacher_dtype(dense, "bfloat16") == torch.bfloat16
    data = random_batches(n=16, seq=16)
    cfg = _stage_cfg(tmp_path / "p", distill_weight=0.5, distill_teacher_dtype="bfloat16", checkpoint_every=0)
    result = prune_stage.run(cfg, model=plain_tiny_llama(), data=data)
    assert result is not None and result.report["log"][0]["kl"] > 0
    from lorashear.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher_dtype"):
        DistillConfig(teacher_dtype="float16")


def test_auto_teacher_dtype_follows_the_device(monkeypatch):
    from lorashear.training import losses

    dense = plain_tiny_llama()
    assert isinstance(losses.native_bf16(torch.device("cpu")), bool) and not losses.native_bf16(torch.device("meta"))
    monkeypatch.setattr(losses, "native_bf16", lambda device: True)
    assert losses.teacher_dtype(dense, "auto") == torch.bfloat16
    monkeypatch.setattr(losses, "native_bf16", lambda device: False)
    assert losses.teacher_dtype(dense, "auto") is None

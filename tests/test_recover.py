"""Dynamic knowledge recovery (lorashear.stages.recover) on tiny models and small made-up sources:
the weights follow the formula, the most degraded source is sampled most, the stop rule fires,
resume is bit-identical, prompts carry no loss, and the output loads and runs."""

from __future__ import annotations

import copy
import json
import string

import pytest
import torch

from lorashear.cli import main
from lorashear.config import config_from_dict
from lorashear.errors import ConfigError, DataError
from lorashear.models.loading import load_pretrained
from lorashear.models.saving import save_pretrained
from lorashear.recovery import lora_finetune
from lorashear.recovery.mixing import allocate, degradation, draw, improvement, sample_subset, sampling_weights
from lorashear.recovery.sources import (
    SourceConfig,
    clean_text,
    keep_long_paragraphs,
    load_source,
    pack_examples,
    render_conversation,
    validation_loss,
)
from lorashear.stages import recover
from lorashear.stages.recover import RecoverConfig
from lorashear.training.losses import masked_lm_loss, split_prompt_mask
from tiny_models import tiny_model

#: the tiny Llama of tests/test_recovery.py (hidden 32, tied embeddings wide enough for LoRA to fit text)
MODEL = dict(size="small", max_position_embeddings=128, tie_word_embeddings=True, vector_std=None, embed_std=0.2,
             dtype=None)
#: a round: 3 steps of 2 sequences of 32 tokens; 2 held-out sequences per source
FAST = {"seq_len": 32, "val_sequences": 2, "min_paragraph_tokens": 8, "steps": 3, "batch_size": 2, "lr": 1e-2,
        "lora_dropout": 0.0, "progress": False, "beta": 0.3}


pytestmark = pytest.mark.usefixtures("one_thread")


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII, built in memory."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def _paragraphs(make, n: int) -> str:
    return "\n\n".join(make(i) for i in range(n)) + "\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three made-up text sources, instruction records, a tokenizer, a student and a dense teacher that
    was trained on source ``a`` (so the student is most degraded there)."""
    root = tmp_path_factory.mktemp("recover")
    words = ["the cat sat on the mat", "a dog ran to the park", "the sun is warm today", "we like to read books"]
    a = root / "a.txt"
    a.write_text(_paragraphs(lambda i: f"{words[i % 4]} and {words[(i + 1) % 4]}. " * 3, 24))
    b = root / "b.txt"
    b.write_text(_paragraphs(lambda i: f"{i} + {i + 1} = {2 * i + 1}; {i * 7 % 10} * 3 = {i * 21 % 30}. " * 2, 24))
    c = root / "c.txt"
    c.write_text(_paragraphs(lambda i: f"THE QUICK BROWN FOX {i} JUMPS OVER THE LAZY DOG! " * 2, 24))
    inst = root / "inst.jsonl"
    with inst.open("w") as fh:
        for i in range(20):
            fh.write(json.dumps({"instruction": f"add {i} and {i + 2}", "input": "" if i % 2 else "be brief",
                                 "output": f"the sum is {2 * i + 2}."}) + "\n")
    tok = char_tokenizer()
    student = tiny_model("llama", vocab=len(tok), **MODEL)
    teacher = copy.deepcopy(student)
    texts = [p for p in a.read_text().split("\n\n") if p.strip()]
    teacher = lora_finetune(teacher, tok, texts, steps=30, batch_size=2, seq_len=32, lr=1e-2, lora_dropout=0.0,
                            progress=False)
    teacher.eval()
    student_dir, teacher_dir = root / "student", root / "teacher"
    save_pretrained(student, student_dir, tok)
    save_pretrained(teacher, teacher_dir, tok)
    return {"root": root, "a": str(a), "b": str(b), "c": str(c), "inst": str(inst), "tok": tok, "student": student,
            "teacher": teacher, "student_dir": str(student_dir), "teacher_dir": str(teacher_dir)}


def _config(world, out, **values) -> RecoverConfig:
    merged = {"model": "student", "teacher": "", "out": str(out), "data": [world["a"], world["b"], world["c"]],
              "instruct_data": [world["inst"]], **FAST, **values}
    return config_from_dict(RecoverConfig, merged)


def _run(world, out, *, stop_after_rounds=None, **values):
    return recover.run(_config(world, out, **values), model=copy.deepcopy(world["student"]), tokenizer=world["tok"],
                       teacher=world["teacher"], stop_after_rounds=stop_after_rounds)


# -- the adaptor's arithmetic ------------------------------------------------------------------------------
def test_sampling_weights_follow_the_formula() -> None:
    deltas = degradation({"a": 5.0, "b": 3.5, "c": 2.0}, {"a": 2.0, "b": 2.5, "c": 2.5})
    assert deltas == {"a": 3.0, "b": 1.0, "c": 0.0}  # Delta_s = max(L_pruned - L_dense, 0)
    w = sampling_weights(deltas, beta=0.3)
    assert w == pytest.approx({"a": 0.7 * 3 / 4 + 0.1, "b": 0.7 * 1 / 4 + 0.1, "c": 0.1})
    assert sum(w.values()) == pytest.approx(1.0)
    assert sampling_weights({"a": 0.0, "b": 0.0}, beta=0.3) == {"a": 0.5, "b": 0.5}  # nothing degraded: uniform
    assert sampling_weights(deltas, beta=1.0) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert sampling_weights(deltas, beta=0.0) == pytest.approx({"a": 0.75, "b": 0.25, "c": 0.0})
    with pytest.raises(ConfigError):
        sampling_weights({"a": -1.0}, beta=0.3)
    assert improvement(2.0, 1.5) == pytest.approx(0.25) and improvement(0.0, 0.0) == 0.0


def test_larger_degradation_is_sampled_more() -> None:
    w = sampling_weights({"a": 3.0, "b": 1.0, "c": 0.0}, beta=0.3)
    assert allocate(w, 40) == {"a": 25, "b": 11, "c": 4}
    assert sum(allocate(w, 7).values()) == 7
    pools = {name: torch.arange(n * 4).view(n, 4) + 1000 * i for i, (name, n) in enumerate(
        [("a", 10), ("b", 30), ("c", 30)])}
    subset, counts, offsets = sample_subset(w, 40, pools, seed=0)
    assert subset.shape == (40, 4) and counts == {"a": 25, "b": 11, "c": 4}
    assert offsets == counts
    again, _, _ = sample_subset(w, 40, pools, seed=0)
    assert torch.equal(subset, again)  # deterministic
    # source a's pool (10 sequences) is read as one permutation after another: every sequence twice, then half
    rows = [int(r[0]) // 4 for r in subset[:25]]
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
    # the next round continues where this one stopped
    nxt, _, after = sample_subset(w, 40, pools, seed=0, offsets=offsets)
    assert after["a"] == 50
    assert [int(r[0]) // 4 for r in nxt[:25]] == draw(10, "a", 25, 25, seed=0)


def test_clean_text_and_short_paragraphs(world) -> None:
    assert clean_text("a\x00b\ufffdc\u200bd\te\r\nf\x1b") == "abcd\te\nf"
    assert clean_text("caf\u00e9 \u4e2d") == "caf\u00e9 \u4e2d"  # letters of any script stay
    texts = ["a long paragraph here\n\nshort\n\nanother long one", "tiny"]
    kept, counts = keep_long_paragraphs(texts, world["tok"], 10)
    assert kept == ["a long paragraph here\n\nanother long one"]
    assert counts == {"paragraphs_kept": 2, "paragraphs_dropped": 2}
    assert keep_long_paragraphs(texts, world["tok"], 0)[0] == texts


def test_sources_hold_out_documents(world) -> None:
    cfg = SourceConfig(seq_len=32, val_sequences=2, min_paragraph_tokens=8)
    src = load_source(world["a"], world["tok"], cfg, seed=0)
    assert src.validation.shape == (2, 32) and src.train.shape[1] == 32
    # 10% of 24 paragraphs held out (3), by document id: 2 validation, 1 test (recovery never reads test)
    assert src.info["documents"] == {"train": 21, "validation": 2}
    assert load_source(world["a"], world["tok"], cfg, seed=0).fingerprint() == src.fingerprint()
    with pytest.raises(DataError, match="held-out"):
        load_source("builtin:heldout", world["tok"], cfg)
    with pytest.raises(DataError, match="min-paragraph-tokens"):
        load_source(world["a"], world["tok"], SourceConfig(seq_len=32, min_paragraph_tokens=10_000))


def test_instruction_loss_masks_the_prompt(world) -> None:
    tok = world["tok"]
    ids = render_conversation([{"role": "user", "content": "add 1 and 2"},
                               {"role": "assistant", "content": "3."}], tok)
    trained = [i for i in ids if i >= 0]
    assert tok.decode(trained) == "3.<eos>"  # only the response and the EOS that ends it carry a loss
    assert tok.decode([~i for i in ids if i < 0]) == "### Instruction:\nadd 1 and 2\n\n### Response:\n"
    packed = pack_examples([ids] * 4, 16, seed=0)
    inputs, labels = split_prompt_mask(packed)
    assert inputs.min() >= 0 and torch.equal(labels >= 0, packed >= 0)
    model = tiny_model("llama", vocab=len(tok), **MODEL)
    logits = model(input_ids=inputs).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    assert masked_lm_loss(model, packed).item() == pytest.approx(expected.item(), rel=1e-6)
    # a batch without prompt tokens: the plain next-token loss
    plain = inputs[:, :8]
    assert masked_lm_loss(model, plain).item() == pytest.approx(model(input_ids=plain, labels=plain).loss.item(),
                                                               rel=1e-5)
    # a packed instruction source holds prompt (negative) and trained tokens; its held-out loss is measured
    src = load_source(world["inst"], tok, SourceConfig(seq_len=32, val_sequences=2), kind="instruction")
    assert (src.train < 0).any() and (src.train >= 0).any()
    assert validation_loss(model, src.validation) > 0


def test_distillation_loss_counts_response_tokens_only(world) -> None:
    from lorashear.training.losses import DistillConfig, masked_distillation_loss

    tok = world["tok"]
    ids = render_conversation([{"role": "user", "content": "add 1 and 2"},
                               {"role": "assistant", "content": "3."}], tok)
    packed = pack_examples([ids] * 4, 16, seed=0)
    student, teacher = world["student"], world["teacher"]
    assert masked_distillation_loss(teacher, DistillConfig(weight=0.0))(student, packed).item() == pytest.approx(
        masked_lm_loss(student, packed).item(), rel=1e-6)
    assert masked_distillation_loss(copy.deepcopy(student), DistillConfig(weight=1.0))(student, packed).item() \
        == pytest.approx(0.0, abs=1e-6)  # the student is its own teacher: no divergence
    inputs, labels = split_prompt_mask(packed)
    s_log = torch.log_softmax(student(input_ids=inputs).logits[:, :-1], -1)
    t_log = torch.log_softmax(teacher(input_ids=inputs).logits[:, :-1], -1)
    kl = (t_log.exp() * (t_log - s_log)).sum(-1)[labels[:, 1:] != -100].mean()
    got = masked_distillation_loss(teacher, DistillConfig(weight=1.0))(student, packed)
    assert got.item() == pytest.approx(kl.item(), rel=1e-5)


def test_run_with_distillation(world, tmp_path) -> None:
    result = _run(world, tmp_path / "kd", max_rounds=1, data=[world["a"], world["b"]], distill_weight=0.5)
    assert result.report["loss"] == {"kind": "cross-entropy + KL to the teacher", "distill_weight": 0.5,
                                     "distill_temperature": 1.0}
    assert result.rounds == 2 and all(torch.isfinite(torch.tensor(r["train_loss_last"]))
                                      for r in result.report["rounds"])


# -- the stage ----------------------------------------------------------------------------------------------
def test_run_follows_the_formula_and_favours_the_degraded_source(world, tmp_path) -> None:
    out = tmp_path / "out"
    result = _run(world, out, max_rounds=2, tolerance=0.0)
    report = json.loads((out / "recover_report.json").read_text())
    first = report["rounds"][0]
    assert first["stage"] == 1
    deltas = {s: r["delta"] for s, r in first["sources"].items()}
    assert {s: r["weight"] for s, r in first["sources"].items()} == pytest.approx(sampling_weights(deltas, 0.3))
    for s, r in first["sources"].items():
        loss, dense = r["validation_loss_before"], r["dense_loss"]
        assert r["delta"] == pytest.approx(max(loss - dense, 0.0))
        assert r["tokens"] == r["sequences"] * 32
    a, b, c = world["a"], world["b"], world["c"]
    assert deltas[a] > deltas[b] and deltas[a] > deltas[c]  # the teacher learnt source a: the student lost most there
    counts = {s: r["sequences"] for s, r in first["sources"].items()}
    assert counts[a] > counts[b] and counts[a] > counts[c] and sum(counts.values()) == 6
    stage2 = [r for r in report["rounds"] if r["stage"] == 2]
    assert stage2 and list(stage2[0]["sources"]) == [world["inst"]]
    assert stage2[0]["sources"][world["inst"]]["weight"] == pytest.approx(1.0)  # 0.7 x 1 + 0.3 / 1 in floats
    assert [s["stage"] for s in result.stages] == [1, 2] and result.rounds == len(report["rounds"])
    # the output directory: a loadable model that runs and matches the returned weights, the plot, no leftovers
    assert (out / "recover.png").stat().st_size > 0
    assert not (out / "checkpoints").exists() and not list(out.glob(".*partial*"))
    loaded = load_pretrained(out)
    probe = torch.tensor([[5, 6, 7, 8, 9]])
    logits = loaded(input_ids=probe).logits
    assert logits.shape == (1, 5, len(world["tok"])) and torch.isfinite(logits).all()
    from transformers import AutoModelForCausalLM  # a uniform model also loads with plain transformers

    assert torch.allclose(logits, AutoModelForCausalLM.from_pretrained(out)(input_ids=probe).logits, atol=1e-5)


def test_stop_rule_fires(world, tmp_path) -> None:
    # an improvement of less than 99% in a round ends the stage after one round
    result = _run(world, tmp_path / "tol", max_rounds=5, tolerance=0.99, instruct_data=["none"])
    (stage,) = result.stages
    assert stage["rounds"] == 1 and stage["stop_reason"] == "converged"
    assert result.report["rounds"][0]["improvement"] < 0.99
    # the round limit
    result = _run(world, tmp_path / "max", max_rounds=1, tolerance=0.0, data=[world["a"]], instruct_data=["none"])
    assert result.stages[0]["rounds"] == 1 and result.stages[0]["stop_reason"] == "max_rounds"


@pytest.mark.parametrize("across", [False, True], ids=["lora_per_round", "lora_across_rounds"])
def test_resume_is_bit_identical(world, tmp_path, across) -> None:
    straight = _run(world, tmp_path / "straight", max_rounds=2, tolerance=0.0, lora_across_rounds=across)
    assert straight.rounds >= 3
    out = tmp_path / "resumed"
    # stopped after stage 1's first round: with lora_across_rounds its factors and optimizer are still open
    assert _run(world, out, max_rounds=2, tolerance=0.0, stop_after_rounds=1, lora_across_rounds=across) is None
    assert (out / "checkpoints").is_dir() and not (out / "recover_report.json").exists()
    resumed = _run(world, out, max_rounds=2, tolerance=0.0, resume=True, lora_across_rounds=across)
    assert resumed.report["resumed_from_round"] == 1

    def strip(rounds):
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rounds]

    assert strip(resumed.report["rounds"]) == strip(straight.report["rounds"])
    a = load_pretrained(tmp_path / "straight").state_dict()
    b = load_pretrained(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("lora_" in k for k in b)  # merged at the stage's end
    # a checkpoint of other settings is refused
    assert _run(world, out, max_rounds=2, tolerance=0.0, stop_after_rounds=1, lora_across_rounds=across) is None
    from lorashear.errors import CheckpointError

    with pytest.raises(CheckpointError, match="other settings"):
        _run(world, out, max_rounds=3, tolerance=0.0, resume=True, lora_across_rounds=across)


def test_a_lora_run_carries_its_factors_and_optimizer_across_calls(world) -> None:
    from lorashear.models.lora import LoraSettings
    from lorashear.recovery.finetune import LoraRun
    from lorashear.training.loop import TrainConfig

    ids = torch.randint(0, len(world["tok"]), (6, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, progress=False)
    model = copy.deepcopy(world["student"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = LoraRun(model, LoraSettings(r=4, alpha=8, dropout=0.0), cfg, seed=0)
    run.train(ids, cfg)
    b_after_one = {n: p.detach().clone() for n, p in run.model.named_parameters() if "lora_B" in n}
    assert all(float(v.abs().max()) > 0 for v in b_after_one.values())  # trained, not re-initialised below
    run.train(ids, cfg)
    steps = {int(st["step"]) for st in run.optimizer.state.values()}
    assert steps == {6}  # one optimizer through both calls
    merged = run.merge()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert any(not torch.equal(before[k], v) for k, v in merged.state_dict().items())
    with pytest.raises(Exception, match="exactly the model's trainable parameters"):
        from lorashear.training.loop import train

        other = LoraRun(copy.deepcopy(world["student"]), LoraSettings(r=4, alpha=8), cfg, seed=0)
        train(other.model, ids, config=cfg, optimizer=run.optimizer)


def test_cli_end_to_end_and_cached_dense_losses(world, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "cli"
    argv = ["recover", world["student_dir"], "--teacher", world["teacher_dir"], "--data", world["a"], "--data",
            world["b"], "--instruct-data", world["inst"], "--out", str(out), "--tokens", "100", "--max-rounds", "1",
            "--seq-len", "32", "--val-sequences", "2", "--min-paragraph-tokens", "8", "--batch-size", "2",
            "--no-progress", "--lr", "0.01"]
    assert main(argv) == 0
    assert "recovered" in capsys.readouterr().out
    report = json.loads((out / "recover_report.json").read_text())
    assert report["steps_per_round"] == 2 and report["sequences_per_round"] == 4  # ceil(100 / (2 * 32))
    assert [s["sources"] for s in report["stages"]] == [[world["a"], world["b"]], [world["inst"]]]
    assert len(json.loads((out / "dense_losses.json").read_text())) == 3
    loaded = load_pretrained(out)
    assert torch.isfinite(loaded(input_ids=torch.tensor([[3, 4, 5]])).logits).all()
    # a second run takes the dense losses from the cache: the teacher is never loaded
    import lorashear.models.loading as loading

    real = loading.load_model

    def no_teacher(name, *args, **kwargs):
        assert name != world["teacher_dir"], "the teacher was loaded although its losses are cached"
        return real(name, *args, **kwargs)

    monkeypatch.setattr(loading, "load_model", no_teacher)
    assert main(argv) == 0


@pytest.mark.parametrize("extra, needle", [
    ([], "--teacher"),
    (["--teacher", "TEACHER", "--data", "/no/such/file.txt"], "file.txt"),
    (["--teacher", "TEACHER", "--data", "builtin:heldout"], "held-out"),
    (["--teacher", "TEACHER", "--beta", "1.5"], "beta"),
    (["--teacher", "TEACHER", "--data", "A", "--data", "A"], "twice"),
])
def test_cli_bad_input_is_one_line_exit_2(world, tmp_path, capsys, extra, needle) -> None:
    extra = [world["teacher_dir"] if e == "TEACHER" else world["a"] if e == "A" else e for e in extra]
    assert main(["recover", world["student_dir"], "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and needle in err[0]

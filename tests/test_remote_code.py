"""Self-contained checkpoints (issue 27): a pruned model whose layers differ carries our modelling file
and ``auto_map``, so plain transformers loads it with ``trust_remote_code=True`` where lorashear cannot
be imported; without it plain transformers refuses it (never loads it wrong); uniform models stay plain."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lorashear
from lorashear.models.saving import REMOTE_CODE_FAMILIES, REMOTE_CODE_FILE, remote_code_source
from tiny_models import tiny_model

#: every family the modelling file covers (Llama-3, Mistral, Qwen2.5 of examples/configs/, the reference
#: model's Llama, and the other supported families)
COVERED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2")
IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 40, 11, 2, 60, 8]])
ROOT = Path(__file__).resolve().parents[1]


def _prune(family: str, *, uniform: bool = False, empty_ffn: bool = False) -> torch.nn.Module:
    """A tiny model of ``family`` with different widths per layer: layer 0 loses a KV group and 2 MLP
    channels, layer 1 a query head slot and 5 MLP channels (``uniform``: both layers lose 4 MLP channels;
    ``empty_ffn``: layer 1 loses its whole MLP, layer 0 three channels)."""
    model = tiny_model(family)
    graph = lorashear.discover(model)
    prunable = graph.prunable()

    def pick(kind: str, layer: int, count: int) -> list:
        return [g for g in prunable if g.kind == kind and g.layer == layer][:count]

    if uniform:
        selection = pick("mlp_channel", 0, 4) + pick("mlp_channel", 1, 4)
    elif empty_ffn:
        selection = pick("mlp_channel", 0, 3) + pick("mlp_channel", 1, 10**6)
    else:
        selection = pick("kv_group", 0, 1) + pick("mlp_channel", 0, 2)
        selection += pick("attention_head", 1, 1) + pick("mlp_channel", 1, 5)
    return lorashear.compact(model, selection).eval()


def _plain_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error",
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"), TOKENIZERS_PARALLELISM="false")
    return env


#: run where lorashear cannot be imported: only torch, transformers, safetensors and peft
_PLAIN_SCRIPT = r'''
import json, sys
sys.modules["lorashear"] = None  # an installed (editable) lorashear must not be found either
src = sys.argv[1]
sys.path[:] = [p for p in sys.path if not p.startswith(src)]
try:
    import lorashear  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("lorashear is importable")
import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
cases = json.loads(sys.argv[2])
ids = torch.tensor(cases.pop("__ids__"))
report = {}
for family, case in cases.items():
    model = AutoModelForCausalLM.from_pretrained(case["dir"], trust_remote_code=True, dtype=torch.float32).eval()
    row = {"class": type(model).__name__,
           "widths": [sorted(str(tuple(p.shape)) for p in layer.parameters()) for layer in model.model.layers]}
    expected = torch.load(case["expected"])
    with torch.no_grad():
        logits = model(ids).logits
    row["max_diff"] = (logits - expected["logits"]).abs().max().item()
    with torch.no_grad():
        out = model.generate(ids[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
    row["generate_equal"] = bool(torch.equal(out, expected["greedy"]))
    # built from the config alone: the same shapes, the family's own init (normal, initializer_range)
    from transformers import AutoConfig
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(case["dir"], trust_remote_code=True),
                                             trust_remote_code=True)
    row["fresh_shapes_equal"] = {n: p.shape for n, p in fresh.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()}
    matrices = [p.flatten() for p in fresh.model.layers.parameters() if p.dim() == 2 and p.numel()]
    row["fresh_std"] = torch.cat(matrices).std().item()
    # save + reload round trip (the modelling file travels with it)
    model.save_pretrained(case["resaved"])
    again = AutoModelForCausalLM.from_pretrained(case["resaved"], trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        row["resaved_diff"] = (again(ids).logits - logits).abs().max().item()
    row["resaved_class"] = type(again).__name__
    # peft LoRA attaches and one training step runs
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model.train(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    row["lora_modules"] = len(lora)
    row["lora_moved"] = any(not torch.equal(p, lora[n]) for n, p in peft_model.named_parameters() if n in lora)
    row["loss_finite"] = bool(torch.isfinite(loss).item())
    report[family] = row
# a plain family loaded afterwards is still the family's own class (no global registration was replaced)
plain = AutoModelForCausalLM.from_pretrained(sys.argv[3], dtype=torch.float32)
report["__plain_class__"] = type(plain).__name__
print("REPORT " + json.dumps(report))
'''


def _expected(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"logits": model(IDS).logits,
                "greedy": model.generate(IDS[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)}


def test_plain_transformers_loads_every_covered_family_without_lorashear(tmp_path, one_thread) -> None:
    cases: dict[str, object] = {"__ids__": IDS.tolist()}
    for family in (*COVERED, "llama_empty_ffn"):
        out = tmp_path / family
        lorashear.save_pretrained(_prune("llama", empty_ffn=True) if family == "llama_empty_ffn" else _prune(family), out)
        config = json.loads((out / "config.json").read_text())
        assert config["per_layer_config"], family
        assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_lorashear."), family
        assert (out / REMOTE_CODE_FILE).read_text() == remote_code_source()  # copied verbatim
        torch.save(_expected(lorashear.load_pretrained(out).eval()), tmp_path / f"{family}.pt")
        cases[family] = {"dir": str(out), "expected": str(tmp_path / f"{family}.pt"),
                         "resaved": str(tmp_path / f"{family}-resaved")}
    uniform = tmp_path / "uniform"
    lorashear.save_pretrained(_prune("llama", uniform=True), uniform)

    done = subprocess.run([sys.executable, "-c", _PLAIN_SCRIPT, str(ROOT / "src"), json.dumps(cases), str(uniform)],
                          capture_output=True, text=True, env=_plain_env(tmp_path), cwd=tmp_path, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    assert report.pop("__plain_class__") == "LlamaForCausalLM"
    for family in (*COVERED, "llama_empty_ffn"):
        row = report[family]
        stem = REMOTE_CODE_FAMILIES[family.removesuffix("_empty_ffn")]
        assert row["class"] == row["resaved_class"] == f"Lorashear{stem}ForCausalLM", (family, row)
        assert len(set(map(tuple, row["widths"]))) > 1, (family, row)  # the layers really differ
        assert row["max_diff"] <= 1e-5, (family, row)
        assert row["fresh_shapes_equal"] and abs(row["fresh_std"] - 0.02) < 0.004, (family, row)
        assert row["generate_equal"], (family, row)
        assert row["resaved_diff"] <= 1e-5, (family, row)
        assert row["lora_modules"] > 0 and row["lora_moved"] and row["loss_finite"], (family, row)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_plain_loading_without_trust_remote_code_refuses(tmp_path, family: str, one_thread) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    lorashear.save_pretrained(_prune(family), out)
    for kwargs in ({}, {"trust_remote_code": False}):
        with pytest.raises((RuntimeError, ValueError), match="(?i)mismatch|size"):
            AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs)
    # the directory still loads with lorashear (its config is the family's own, read without remote code)
    assert lorashear.load_pretrained(out).config.is_heterogeneous


def test_uniform_model_stays_plain(tmp_path, one_thread) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "uniform"
    lorashear.save_pretrained(_prune("llama", uniform=True), out)
    config = json.loads((out / "config.json").read_text())
    assert not config.get("per_layer_config") and "auto_map" not in config
    assert not (out / REMOTE_CODE_FILE).exists()
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"


def test_no_modelling_file_where_plain_transformers_builds_the_layers(tmp_path, monkeypatch, one_thread) -> None:
    """A transformers that builds ``per_layer_config`` itself wins: no auto_map, no file."""
    from lorashear.models import saving

    monkeypatch.setattr(saving, "plain_loading_builds", lambda directory: True)
    out = tmp_path / "pruned"
    lorashear.save_pretrained(_prune("llama"), out)
    config = json.loads((out / "config.json").read_text())
    assert config["per_layer_config"] and "auto_map" not in config
    assert not (out / REMOTE_CODE_FILE).exists()


def test_plain_loading_builds_detects_per_layer_shapes(tmp_path, one_thread) -> None:
    from lorashear.models.saving import plain_loading_builds

    model = _prune("llama")
    model.save_pretrained(tmp_path / "hetero")
    assert not plain_loading_builds(tmp_path / "hetero")  # transformers 5.23 builds the global widths
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    assert plain_loading_builds(tmp_path / "dense")


def test_modelling_file_imports_only_torch_and_transformers() -> None:
    tree = ast.parse(remote_code_source())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert roots <= {"__future__", "copy", "logging", "torch", "transformers"}, roots
    for stem in REMOTE_CODE_FAMILIES.values():
        assert f"class Lorashear{stem}Config(" in remote_code_source()
        assert f"class Lorashear{stem}ForCausalLM(" in remote_code_source()


def test_modelling_file_steps_aside_when_transformers_builds_per_layer(tmp_path, one_thread) -> None:
    """Loaded in a fresh process: with a family class that already builds each layer from its layer
    config, the modelling file's class builds nothing of its own (the family's layers are kept)."""
    out = tmp_path / "pruned"
    lorashear.save_pretrained(_prune("llama"), out)
    script = textwrap.dedent(r'''
        import sys, torch
        sys.modules["lorashear"] = None
        from transformers.models.llama import modeling_llama
        from transformers import AutoModelForCausalLM
        original = modeling_llama.LlamaModel.__init__
        def native(self, config):  # what a transformers that builds per_layer_config would do
            original(self, config)
            if getattr(config, "is_heterogeneous", False):
                self.layers = torch.nn.ModuleList(
                    [modeling_llama.LlamaDecoderLayer(config.per_layer_config[i], i) for i in range(len(self.layers))])
                for layer in self.layers:
                    layer.native = True
        modeling_llama.LlamaModel.__init__ = native
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
        print("NATIVE", all(getattr(layer, "native", False) for layer in model.model.layers))
    ''')
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                          env=_plain_env(tmp_path), cwd=tmp_path, timeout=300)
    assert "NATIVE True" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


# ----------------------------------------------------------------------------- the reference model

_REFERENCE_SCRIPT = r'''
import sys
sys.modules["lorashear"] = None
import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
expected = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
    out = model.generate(expected["ids"], max_new_tokens=4, do_sample=False)
print("REFERENCE", type(model).__name__, diff, bool(torch.equal(out, expected["greedy"])))
'''

#: lm-eval's command line (``lm_eval ...``), run where lorashear cannot be imported
_LM_EVAL_CLI = "import sys; sys.modules['lorashear'] = None; from lm_eval.__main__ import cli_evaluate; cli_evaluate()"


@pytest.mark.integration
def test_reference_model_pruned_per_layer_loads_and_evaluates_without_lorashear(tmp_path, one_thread) -> None:
    """SmolLM2 (Llama) pruned differently per layer: plain transformers with ``trust_remote_code=True``
    gives lorashear's logits, and lm-eval's own command line scores it on an offline task."""
    from lorashear.evaluation.tasks import prepared_data_dir, read_manifest, write_task_yamls

    model = lorashear.load_model("smollm2-135m-instruct")
    tokenizer = lorashear.load_tokenizer("smollm2-135m-instruct")
    prunable = lorashear.discover(model).prunable()

    def pick(kind: str, layer: int, count: int) -> list:
        return [g for g in prunable if g.kind == kind and g.layer == layer][:count]

    selection = pick("mlp_channel", 3, 256) + pick("mlp_channel", 10, 128) + pick("kv_group", 5, 1)
    selection += pick("attention_head", 20, 1)
    out = tmp_path / "pruned"
    lorashear.save_pretrained(lorashear.compact(model, selection), out, tokenizer=tokenizer)
    assert json.loads((out / "config.json").read_text())["auto_map"]
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    reloaded = lorashear.load_pretrained(out).eval()
    with torch.no_grad():
        torch.save({"ids": ids, "logits": reloaded(ids).logits,
                    "greedy": reloaded.generate(ids, max_new_tokens=4, do_sample=False)}, tmp_path / "expected.pt")
    done = subprocess.run([sys.executable, "-c", _REFERENCE_SCRIPT, str(out), str(tmp_path / "expected.pt")],
                          capture_output=True, text=True, env=_plain_env(tmp_path), cwd=tmp_path, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("REFERENCE ")), None)
    assert line is not None, done.stdout[-2000:] + done.stderr[-3000:]
    _, name, diff, greedy = line.split()
    assert name == "LorashearLlamaForCausalLM" and float(diff) <= 1e-5 and greedy == "True"

    if read_manifest(prepared_data_dir()) is None:
        pytest.skip("offline zero-shot tasks not prepared (prepare_eval_data())")
    write_task_yamls(tmp_path / "tasks", names=["lorashear_zs_arc_easy"])
    done = subprocess.run(
        [sys.executable, "-c", _LM_EVAL_CLI, "--model", "hf",
         "--model_args", f"pretrained={out},trust_remote_code=True,dtype=float32",
         "--tasks", "lorashear_zs_arc_easy", "--include_path", str(tmp_path / "tasks"),
         "--limit", "3", "--device", "cpu", "--batch_size", "4"],
        capture_output=True, text=True, env={**_plain_env(tmp_path), "HF_DATASETS_OFFLINE": "1"}, cwd=tmp_path,
        timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "|lorashear_zs_arc_easy|" in done.stdout and "acc" in done.stdout, done.stdout[-2000:]

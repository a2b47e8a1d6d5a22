"""Structural rules: no import cycles, components stay below ``commands/`` and the package root,
and per-family facts (LoRA targets, norm offsets) come from the model adapters."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = "lorashear"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

#: modules allowed to import ``lorashear.commands`` (the command-line layer itself)
_COMMAND_LAYER = ("lorashear.cli", "lorashear.__main__", "lorashear.commands")
#: leaves of the package root that components may import
_ROOT_LEAVES = ("lorashear._version",)


# ----------------------------------------------------------------------------- the import graph

def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """``module name -> file`` for every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    out: dict[str, Path] = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def imports_of(module: str, path: Path, modules: Iterable[str], package: str = PACKAGE) -> set[str]:
    """Package modules that ``module`` imports anywhere in its file (function bodies and
    ``TYPE_CHECKING`` blocks included). ``from pkg import name`` imports ``pkg.name`` when that is
    a module, else ``pkg`` itself (its ``__init__``)."""
    known = set(modules)
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # the longest known module that ``name`` is (or lies in)
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            if not (base == package or base.startswith(package + ".")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base)
    found.discard(module)
    return found


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    files = module_files(src, package)
    return {name: imports_of(name, path, files, package) for name, path in files.items()}


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), by Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    nodes = set(graph) | {m for targets in graph.values() for m in targets}

    for root in sorted(nodes):
        if root in index:
            continue
        # iterative Tarjan: (node, iterator over its successors)
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    cycles.append(sorted(component))
    return sorted(cycles)


def _describe(cycle: list[str], graph: Mapping[str, Iterable[str]]) -> str:
    members = set(cycle)
    edges = [f"{a} -> {b}" for a in cycle for b in sorted(graph.get(a, ())) if b in members]
    return "{" + ", ".join(cycle) + "}: " + "; ".join(edges)


# ----------------------------------------------------------------------------- tests

def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c"], ["e"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_import_graph_resolves_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("x = 1\ndef f():\n    from .sub import b\n    from . import y\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom ..a import x\nimport pkg.sub\n")
    graph = import_graph(pkg, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b", "pkg"}, "pkg.sub": set(),
                     "pkg.sub.b": {"pkg.a", "pkg.sub"}}
    assert find_cycles(graph) == [["pkg", "pkg.a", "pkg.sub.b"]]


def test_no_import_cycles():
    graph = import_graph()
    assert "lorashear.graph.groups" in graph and graph["lorashear.compaction"], "the import graph looks empty"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, graph) for c in cycles)


def test_components_do_not_import_commands_or_the_package_root():
    graph = import_graph()
    bad = []
    for module, targets in sorted(graph.items()):
        if module == PACKAGE or module.startswith(_COMMAND_LAYER):
            continue
        for target in sorted(targets):
            if target == PACKAGE or target == "lorashear.commands" or target.startswith("lorashear.commands."):
                bad.append(f"{module} -> {target}")
    assert not bad, "components must not import lorashear.commands or the package root:\n" + "\n".join(bad)


def test_training_is_general_and_lhspg_builds_on_it():
    """``training`` (loop, losses, hooks interface, optimizer, checkpoints) imports nothing of ``lhspg``;
    ``lhspg`` brings its own hooks and ``train_lhspg`` on top of it."""
    graph = import_graph()
    training = {m: t for m, t in graph.items() if m == "lorashear.training" or m.startswith("lorashear.training.")}
    assert "lorashear.training.loop" in training
    bad = [f"{m} -> {t}" for m, targets in sorted(training.items()) for t in sorted(targets)
           if t == "lorashear.lhspg" or t.startswith("lorashear.lhspg.")]
    assert not bad, "training must not import lhspg:\n" + "\n".join(bad)
    assert "lorashear.training.loop" in graph["lorashear.lhspg.train"]


# ----------------------------------------------------------------------------- family facts

@pytest.mark.parametrize("family, expected", [
    ("phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_attach_lora_default_targets(family, expected):
    from tiny_models import tiny_model

    from lorashear.models.lora import LoraSettings, attach_lora

    model = attach_lora(tiny_model(family), LoraSettings(r=2, alpha=4))
    assert {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters()
            if ".lora_A." in n} == expected
    assert not any("lm_head" in n for n, _ in model.named_parameters() if "lora_" in n)


def test_attach_lora_rejects_unknown_targets():
    from tiny_models import tiny_model

    from lorashear.errors import ConfigError
    from lorashear.models.lora import LoraSettings, attach_lora

    with pytest.raises(ConfigError, match="nope_proj"):
        attach_lora(tiny_model("llama"), LoraSettings(targets=("q_proj", "nope_proj")))


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"dropout": -0.1}])
def test_lora_settings_validated(kwargs):
    from lorashear.errors import ConfigError
    from lorashear.models.lora import LoraSettings

    with pytest.raises(ConfigError):
        LoraSettings(**kwargs)


def test_norm_offset_comes_from_the_adapter():
    from tiny_models import tiny_config

    from lorashear.models.adapters import BLOCK_OF_KIND, adapter_for

    assert adapter_for(tiny_config("gemma")).norm_offset == -1.0
    assert adapter_for(tiny_config("gemma2")).norm_offset == -1.0
    for family in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        assert adapter_for(tiny_config(family)).norm_offset == 0.0
    assert BLOCK_OF_KIND == {"attention_head": "attention", "kv_group": "attention", "mlp_channel": "mlp"}


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_hidden_norm_rescale_uses_the_adapter_offset(family):
    """Removing zero channels and rescaling the norm with the adapter's offset keeps the outputs."""
    from types import SimpleNamespace

    import torch
    from tiny_models import tiny_config
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorashear.compaction import _rescale_norms_for_hidden
    from lorashear.models.adapters import adapter_for

    norm_class = GemmaRMSNorm if family == "gemma" else LlamaRMSNorm
    torch.manual_seed(0)
    n, kept = 8, [0, 1, 2, 4, 5, 7]
    norm = norm_class(n, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5)
    x = torch.randn(3, n)
    x[:, [3, 6]] = 0.0
    expected = norm(x)[:, kept]
    small = norm_class(len(kept), eps=1e-6)
    with torch.no_grad():
        small.weight.copy_(norm.weight[kept])
    config = SimpleNamespace(hidden_size=n, rms_norm_eps=1e-6)
    _rescale_norms_for_hidden(torch.nn.Sequential(small), config, n - len(kept),
                              adapter_for(tiny_config(family)).norm_offset)
    assert config.hidden_size == len(kept)
    torch.testing.assert_close(small(x[:, kept]), expected)

"""GGUF export: uniform models as llama, per-layer widths as deci, read back with gguf-py.

The numbers are checked without llama.cpp: :func:`_gguf_forward` runs the computation of
llama.cpp's llama/deci graph (``src/models/deci.cpp``: interleaved "normal" RoPE on the permuted
Q/K rows, GQA head ``h`` reading KV head ``h // (n_head / n_head_kv)``, a layer with FFN width 0
skipped whole) on the tensors as read from the file, and compares with transformers' logits.
Running the file in llama.cpp itself is not part of these tests yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lorashear
from lorashear.cli import main
from lorashear.errors import ConfigError, UnsupportedArchitectureError
from tiny_models import tiny_model

gguf = pytest.importorskip("gguf")

from lorashear.export import export_gguf  # noqa: E402
from lorashear.export.gguf import permute_rotary  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Pruned models still have to speak English.",
         "llama.cpp runs GGUF files; deci layers may differ in width.", "1 2 3 4 5 6 7 8 9 10 11 12"] * 8
LAYER_KEYS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
              "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A tiny GPT-2 style byte-level BPE tokenizer (trained here; no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 9), generator=torch.Generator().manual_seed(3))


def _pruned(vocab: int, kind: str, **overrides) -> torch.nn.Module:
    """A tiny 3-layer Llama, compacted: ``uniform`` (the same structures in every layer),
    ``per_layer`` (layers differ), ``empty_ffn`` (layer 1 loses its whole MLP) or ``dense``."""
    model = tiny_model("llama", vocab=vocab, layers=3, **overrides)
    if kind == "dense":
        return model
    graph = lorashear.discover(model)
    pool = graph.prunable()
    if kind == "uniform":
        selection = [g for g in pool if g.kind == "mlp_channel" and g.index < 8]
        selection += [g for g in pool if g.kind == "attention_head" and g.index == 2]
    elif kind == "per_layer":
        selection = [g for g in pool if g.kind == "mlp_channel" and g.layer == 1 and g.index < 5]
        selection += [g for g in pool if g.kind == "kv_group" and g.layer == 0 and g.index == 1]
        selection += [g for g in pool if g.kind == "attention_head" and g.layer == 2 and g.index == 0]
    elif kind == "empty_ffn":
        selection = [g for g in pool if g.kind == "mlp_channel" and g.layer == 1]
        selection += [g for g in pool if g.kind == "mlp_channel" and g.layer == 2 and g.index < 3]
    else:
        raise KeyError(kind)
    return lorashear.compact(model, selection).eval()


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


def _array(t) -> np.ndarray:
    """A tensor read back as float32, in PyTorch's (rows, row width) order."""
    shape = tuple(int(s) for s in reversed(t.shape))
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.array(t.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)


def _gguf_forward(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of llama.cpp's llama/deci graph computed from the GGUF file (fp32, one sequence)."""
    fields, reader = _fields(path)
    arch = fields["general.architecture"]
    n_layer = fields[f"{arch}.block_count"]

    def per_layer(key: str) -> list[int]:
        value = fields[f"{arch}.{key}"]
        return list(value) if isinstance(value, list) else [value] * n_layer

    heads, kv_heads, ffn = per_layer("attention.head_count"), per_layer("attention.head_count_kv"), \
        per_layer("feed_forward_length")
    hd = fields[f"{arch}.attention.key_length"]
    eps = fields[f"{arch}.attention.layer_norm_rms_epsilon"]
    base = fields[f"{arch}.rope.freq_base"]
    w = {t.name: torch.from_numpy(_array(t)).double() for t in reader.tensors}

    def rms(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    n = ids.shape[1]
    pos = torch.arange(n, dtype=torch.float64)
    theta = pos[:, None] * base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (T, hd/2)
    cos, sin = torch.cos(theta)[:, None, :], torch.sin(theta)[:, None, :]

    def rope_normal(x):  # ggml's "normal" mode: rotate the pairs (2i, 2i+1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    x = w["token_embd.weight"][ids[0]]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for il in range(n_layer):
        p = f"blk.{il}."
        inp = x
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope_normal((h @ w[p + "attn_q.weight"].T).view(n, heads[il], hd))
        k = rope_normal((h @ w[p + "attn_k.weight"].T).view(n, kv_heads[il], hd))
        v = (h @ w[p + "attn_v.weight"].T).view(n, kv_heads[il], hd)
        group = heads[il] // kv_heads[il]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        att = torch.softmax(torch.einsum("thd,shd->hts", q, k) / hd ** 0.5 + mask, dim=-1)
        attn_out = torch.einsum("hts,shd->thd", att, v).reshape(n, heads[il] * hd) @ w[p + "attn_output.weight"].T
        if ffn[il] == 0:  # deci: the whole layer is skipped, attention output included
            continue
        ffn_inp = attn_out + inp
        h = rms(ffn_inp, w[p + "ffn_norm.weight"])
        act = torch.nn.functional.silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)
        x = act @ w[p + "ffn_down.weight"].T + ffn_inp
    x = rms(x, w["output_norm.weight"])
    head = w.get("output.weight", w["token_embd.weight"])
    return (x @ head.T).float()


def _hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float()


def _expected_tensors(model) -> dict[str, list[int]]:
    """Every tensor name the file must hold, with its shape in ggml order (row width first)."""
    out = {"token_embd.weight": list(reversed(model.get_input_embeddings().weight.shape)),
           "output_norm.weight": [model.config.hidden_size]}
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        for key, t in zip(LAYER_KEYS, (layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight,
                                       a.v_proj.weight, a.o_proj.weight, layer.post_attention_layernorm.weight,
                                       m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)):
            out[f"blk.{i}.{key}"] = list(reversed(t.shape))
    if not model.config.tie_word_embeddings:
        out["output.weight"] = list(reversed(model.lm_head.weight.shape))
    return {k: [int(s) for s in v] for k, v in out.items()}


# ------------------------------------------------------------------------------------ unit

def test_permute_rotary_interleaves_the_two_halves_of_each_head() -> None:
    rows = np.arange(2 * 8, dtype=np.float32)[:, None] * np.ones((1, 3), dtype=np.float32)  # 2 heads, hd 8
    out = permute_rotary(rows, 2)[:, 0]
    assert out.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    with pytest.raises(ValueError):
        permute_rotary(rows, 3)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_uniform_model_is_written_as_llama(tmp_path, bpe_tokenizer, tied: bool) -> None:
    model = _pruned(len(bpe_tokenizer), "uniform", tie_word_embeddings=tied)
    result = export_gguf(model, tmp_path / "u.gguf", tokenizer=bpe_tokenizer, outtype="f32")
    fields, reader = _fields(tmp_path / "u.gguf")
    assert result.arch == fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 3
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.feed_forward_length"] == 32
    assert fields["llama.embedding_length"] == 48 and fields["llama.attention.key_length"] == 8
    assert fields["llama.rope.dimension_count"] == 8 and fields["llama.vocab_size"] == len(bpe_tokenizer)
    assert {t.name: [int(s) for s in t.shape] for t in reader.tensors} == _expected_tensors(model)
    assert ("output.weight" in {t.name for t in reader.tensors}) is not tied
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"} and not result.fallbacks
    ids = _ids(len(bpe_tokenizer))
    torch.testing.assert_close(_gguf_forward(tmp_path / "u.gguf", ids), _hf_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_per_layer_widths_are_written_as_deci(tmp_path, bpe_tokenizer) -> None:
    model = _pruned(len(bpe_tokenizer), "per_layer")
    result = export_gguf(model, tmp_path / "d.gguf", tokenizer=bpe_tokenizer, outtype="f32")
    fields, reader = _fields(tmp_path / "d.gguf")
    assert result.arch == fields["general.architecture"] == "deci" and not result.uniform
    assert fields["deci.attention.head_count"] == result.head_count == [3, 6, 4]
    assert fields["deci.attention.head_count_kv"] == result.head_count_kv == [1, 2, 2]
    assert fields["deci.feed_forward_length"] == result.feed_forward_length == [40, 35, 40]
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 8
    assert {t.name: [int(s) for s in t.shape] for t in reader.tensors} == _expected_tensors(model)
    assert [r["name"] for r in result.tensors] == [t.name for t in reader.tensors]
    ids = _ids(len(bpe_tokenizer))
    torch.testing.assert_close(_gguf_forward(tmp_path / "d.gguf", ids), _hf_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_arch_deci_writes_a_uniform_model_with_per_layer_arrays_and_llama_refuses_differing_layers(
        tmp_path, bpe_tokenizer) -> None:
    model = _pruned(len(bpe_tokenizer), "uniform")
    result = export_gguf(model, tmp_path / "ud.gguf", tokenizer=bpe_tokenizer, outtype="f32", arch="deci")
    fields, reader = _fields(tmp_path / "ud.gguf")
    assert result.arch == fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [4, 4, 4] and fields["deci.feed_forward_length"] == [32, 32, 32]
    assert {t.name: [int(s) for s in t.shape] for t in reader.tensors} == _expected_tensors(model)
    ids = _ids(len(bpe_tokenizer))
    torch.testing.assert_close(_gguf_forward(tmp_path / "ud.gguf", ids), _hf_logits(model, ids), atol=1e-4, rtol=1e-4)
    per_layer = _pruned(len(bpe_tokenizer), "per_layer")
    with pytest.raises(ConfigError, match="differ"):
        export_gguf(per_layer, tmp_path / "x.gguf", tokenizer=bpe_tokenizer, arch="llama")
    with pytest.raises(ConfigError, match="architecture"):
        export_gguf(per_layer, tmp_path / "x.gguf", tokenizer=bpe_tokenizer, arch="mistral")
    assert not list(tmp_path.glob("x.gguf*"))


def test_tokenizer_is_embedded(tmp_path, bpe_tokenizer) -> None:
    model = _pruned(len(bpe_tokenizer), "dense")
    result = export_gguf(model, tmp_path / "t.gguf", tokenizer=bpe_tokenizer)
    fields, _ = _fields(tmp_path / "t.gguf")
    assert fields["tokenizer.ggml.model"] == "gpt2"
    vocab = bpe_tokenizer.get_vocab()
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == len(bpe_tokenizer) and all(tokens[i] == t for t, i in vocab.items())
    types = fields["tokenizer.ggml.token_type"]
    assert types[vocab["<|im_start|>"]] == gguf.TokenType.CONTROL and types[vocab["Ġ"]] == gguf.TokenType.NORMAL
    assert len(fields["tokenizer.ggml.merges"]) > 0
    assert fields["tokenizer.ggml.bos_token_id"] == bpe_tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == bpe_tokenizer.eos_token_id
    # a tokenizer llama.cpp's converter does not know: named "default", and the result says so
    assert fields["tokenizer.ggml.pre"] == result.tokenizer_pre == "default"
    assert any("pre-tokenizer" in note for note in result.notes)
    named = export_gguf(model, tmp_path / "t2.gguf", tokenizer=bpe_tokenizer, tokenizer_pre="gpt-2")
    assert _fields(tmp_path / "t2.gguf")[0]["tokenizer.ggml.pre"] == named.tokenizer_pre == "gpt-2"


def test_f16_keeps_norms_f32(tmp_path, bpe_tokenizer) -> None:
    model = _pruned(len(bpe_tokenizer), "per_layer")
    export_gguf(model, tmp_path / "h.gguf", tokenizer=bpe_tokenizer, outtype="f16")
    _, reader = _fields(tmp_path / "h.gguf")
    for t in reader.tensors:
        assert t.tensor_type.name == ("F32" if len(t.shape) == 1 else "F16"), t.name
    ids = _ids(len(bpe_tokenizer))
    torch.testing.assert_close(_gguf_forward(tmp_path / "h.gguf", ids), _hf_logits(model, ids), atol=2e-2, rtol=2e-2)


def test_layer_without_ffn_but_with_attention_is_padded_or_refused(tmp_path, bpe_tokenizer) -> None:
    model = _pruned(len(bpe_tokenizer), "empty_ffn")
    assert model.model.layers[1].mlp.gate_proj.weight.shape[0] == 0
    with pytest.raises(ConfigError, match=r"layer 1 keeps 6 attention heads but has no FFN channel left.*"
                                          r"drop its attention output"):
        export_gguf(model, tmp_path / "refused.gguf", tokenizer=bpe_tokenizer, empty_ffn="refuse")
    assert not (tmp_path / "refused.gguf").exists() and not list(tmp_path.iterdir())

    result = export_gguf(model, tmp_path / "p.gguf", tokenizer=bpe_tokenizer, outtype="f32")
    assert result.arch == "deci" and result.padded_ffn_layers == [1]
    assert result.feed_forward_length == [40, 1, 37]
    assert any("layer 1" in note and "zero FFN of width 1" in note for note in result.notes)
    fields, reader = _fields(tmp_path / "p.gguf")
    assert fields["deci.feed_forward_length"] == [40, 1, 37]
    shapes = {t.name: [int(s) for s in t.shape] for t in reader.tensors}
    assert shapes["blk.1.ffn_gate.weight"] == [48, 1] and shapes["blk.1.ffn_down.weight"] == [1, 48]
    ids = _ids(len(bpe_tokenizer))
    # exact: the padded file computes the pruned model, although deci skips layers whose FFN width is 0
    torch.testing.assert_close(_gguf_forward(tmp_path / "p.gguf", ids), _hf_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_q8_0_falls_back_to_f16_where_the_row_width_does_not_divide(tmp_path, bpe_tokenizer) -> None:
    shape = dict(hidden_size=64, head_dim=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    model = tiny_model("llama", vocab=len(bpe_tokenizer), layers=2, **shape)
    graph = lorashear.discover(model)
    model = lorashear.compact(model, [g for g in graph.prunable() if g.kind == "mlp_channel" and g.layer == 1
                                      and g.index < 5]).eval()
    result = export_gguf(model, tmp_path / "q.gguf", tokenizer=bpe_tokenizer, outtype="q8_0")
    assert result.arch == "deci"
    assert result.fallbacks == [{"name": "blk.1.ffn_down.weight", "shape": [59, 64], "wanted": "Q8_0",
                                 "written": "F16", "reason": "row width 59 is not a multiple of 32 (Q8_0 block)"}]
    fields, reader = _fields(tmp_path / "q.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"
    assert all(types[t.name] == "F32" for t in reader.tensors if len(t.shape) == 1)
    assert sum(v == "Q8_0" for v in types.values()) == len([t for t in reader.tensors if len(t.shape) == 2]) - 1
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert {t.name: [int(s) for s in t.shape] for t in reader.tensors} == _expected_tensors(model)
    ids = _ids(len(bpe_tokenizer))
    logits, expected = _gguf_forward(tmp_path / "q.gguf", ids), _hf_logits(model, ids)
    assert (logits - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_unsupported_family_is_refused(tmp_path, bpe_tokenizer) -> None:
    model = tiny_model("qwen3", vocab=len(bpe_tokenizer))
    with pytest.raises(UnsupportedArchitectureError, match="qwen3"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer)
    with pytest.raises(ConfigError, match="outtype"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer, outtype="q4_k")


def test_stage_and_cli_export_a_saved_per_layer_directory(tmp_path, bpe_tokenizer, capsys) -> None:
    from lorashear.stages import export
    from lorashear.stages.export import ExportConfig

    model = _pruned(len(bpe_tokenizer), "per_layer")
    lorashear.save_pretrained(model, tmp_path / "pruned", bpe_tokenizer)
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["per_layer_config"]
    result = export.run(ExportConfig(model=str(tmp_path / "pruned"), out=str(tmp_path / "a.gguf"), outtype="f32"))
    assert result.arch == "deci" and result.path == str(tmp_path / "a.gguf")
    assert result.gguf.head_count == [3, 6, 4] and result.to_dict()["gguf"]["arch"] == "deci"
    ids = _ids(len(bpe_tokenizer))
    torch.testing.assert_close(_gguf_forward(tmp_path / "a.gguf", ids), _hf_logits(model, ids), atol=1e-4, rtol=1e-4)

    assert main(["export", str(tmp_path / "pruned"), "--out", str(tmp_path / "b.gguf"), "--outtype", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "arch deci" in out and "written as F16" in out and "blk.0.ffn_down.weight (40)" in out
    assert (tmp_path / "b.gguf").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["export", "/tmp/definitely-missing-model-dir", "--out", "x.gguf"], "does not exist"),
    (["export", "NOTADIR", "--out", "x.gguf", "--outtype", "q4_k"], "--outtype"),
    (["export", "NOTADIR", "--out", "x.gguf", "--format", "onnx"], "format"),
    (["export", "NOTADIR"], "--out"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, needle) -> None:
    argv = [a.replace("NOTADIR", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_cli_refuses_a_directory_without_config(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0]


# ------------------------------------------------------------------------------------ reference tokenizer

@pytest.fixture(scope="module")
def reference_tokenizer():
    from lorashear.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.mark.integration
def test_reference_tokenizer_is_recognised_as_smollm(tmp_path, reference_tokenizer) -> None:
    tok = reference_tokenizer
    model = _pruned(len(tok), "per_layer")
    lorashear.save_pretrained(model, tmp_path / "pruned", tok)
    assert main(["export", str(tmp_path / "pruned"), "--out", str(tmp_path / "s.gguf"), "--outtype", "f32"]) == 0
    fields, reader = _fields(tmp_path / "s.gguf")
    assert fields["general.architecture"] == "deci" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"]) == len(tok) == 49152
    assert fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert fields["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL
    assert len(fields["tokenizer.ggml.merges"]) == 48900
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert "im_start" in fields["tokenizer.chat_template"]
    assert {t.name: [int(s) for s in t.shape] for t in reader.tensors} == _expected_tensors(model)
    ids = torch.tensor([tok.encode("The capital of France is")])
    torch.testing.assert_close(_gguf_forward(tmp_path / "s.gguf", ids), _hf_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.integration
def test_reference_tokenizer_uniform_export(tmp_path, reference_tokenizer) -> None:
    tok = reference_tokenizer
    model = _pruned(len(tok), "uniform", tie_word_embeddings=True)
    result = export_gguf(model, tmp_path / "u.gguf", tokenizer=tok, outtype="q8_0")
    fields, reader = _fields(tmp_path / "u.gguf")
    assert result.arch == fields["general.architecture"] == "llama" and result.tokenizer_pre == "smollm"
    assert "output.weight" not in {t.name for t in reader.tensors}
    # hidden 48 does not divide by 32 (matrices reading the hidden state fall back, and are listed);
    # 4 heads x 8 = 32 (attn_output) and FFN 32 (ffn_down) do, and are Q8_0
    matrices = {t.name: (int(t.shape[0]), t.tensor_type.name) for t in reader.tensors if len(t.shape) == 2}
    assert {f["name"] for f in result.fallbacks} == {n for n, (width, _) in matrices.items() if width % 32}
    assert {n for n, (_, kind) in matrices.items() if kind == "Q8_0"} == {
        f"blk.{i}.{k}" for i in range(3) for k in ("attn_output.weight", "ffn_down.weight")}


def test_export_formats_are_a_registry(tmp_path, bpe_tokenizer) -> None:
    """A format is one registered entry: the stage validates against it and dispatches to its writer."""
    from lorashear.export import formats
    from lorashear.stages import export
    from lorashear.stages.export import ExportConfig

    assert "gguf" in formats.FORMATS and formats.get_format("gguf").suffix == ".gguf"
    with pytest.raises(ConfigError, match="unknown export format 'plain'"):
        ExportConfig(model="m", out="x", format="plain")
    calls = []

    class Written:
        def __init__(self, path):
            self.path = path

        def to_dict(self):
            return {"path": self.path}

    def write(model, out, *, tokenizer, outtype, **options):
        calls.append((outtype, sorted(options)))
        Path(out).write_text("weights")
        return Written(str(out))

    formats.register_format(formats.ExportFormat(name="plain", suffix=".txt", outtypes=("f32",), options=(),
                                                 check=lambda model: None, write=write))
    try:
        with pytest.raises(ConfigError, match="outtype 'f16'"):
            ExportConfig(model="m", out="x", format="plain", outtype="f16")
        model = _pruned(len(bpe_tokenizer), "per_layer")
        result = export.run(ExportConfig(out=str(tmp_path / "m.txt"), format="plain", outtype="f32"), model=model,
                            tokenizer=bpe_tokenizer)
        assert calls == [("f32", [])] and result.llama_cpp is None
        assert result.to_dict()["plain"] == {"path": str(tmp_path / "m.txt")}
        with pytest.raises(AttributeError):
            result.gguf
    finally:
        del formats.FORMATS["plain"]

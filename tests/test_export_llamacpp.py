"""The exported GGUF runs in llama.cpp itself (llama-cpp-python, built from source by scripts/setup.sh).

The reference model, compacted so that its layers differ (query heads, KV groups and FFN widths per
layer, one layer whose whole MLP is gone), is exported and loaded by llama.cpp; its next-token logits
are compared with transformers' on a few prompts. At f32 top-1 agreement must be 100%; the largest
logit difference is printed and bounded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorashear
from lorashear.export import export_gguf

pytestmark = pytest.mark.integration

try:
    import llama_cpp
except ImportError as exc:  # set-up installs it; a missing build is a set-up failure, not a skip
    raise ImportError("llama-cpp-python is not installed: run `bash scripts/setup.sh` (it builds it)") from exc

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Elizabeth Bennet looked at Mr. Darcy and",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def pruned_reference():
    """The reference model with a non-uniform, deterministic selection of structures removed."""
    model = lorashear.load_model("smollm2-135m-instruct")
    tokenizer = lorashear.load_tokenizer("smollm2-135m-instruct")
    graph = lorashear.discover(model)
    pool = graph.prunable()
    selection = [g for g in pool if g.kind == "mlp_channel" and g.layer not in (None, 5)
                 and g.index < 40 * (g.layer % 7)]                                   # FFN widths differ per layer
    selection += [g for g in pool if g.kind == "mlp_channel" and g.layer == 5]         # layer 5: no MLP left
    selection += [g for g in pool if g.kind == "attention_head" and g.layer in (2, 9) and g.index == 1]
    selection += [g for g in pool if g.kind == "kv_group" and g.layer == 12 and g.index == 0]
    small = lorashear.compact(model, selection).eval()
    return small, tokenizer


def _hf_next_logits(model, tokenizer, prompt: str) -> np.ndarray:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return model(ids).logits[0, -1].double().numpy()


def _llama_next_logits(llm, tokenizer, prompt: str) -> np.ndarray:
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)


@pytest.mark.parametrize("outtype, max_diff", [("f32", 0.05), ("f16", 0.5)])
def test_llama_cpp_runs_the_non_uniform_export(tmp_path, pruned_reference, outtype, max_diff) -> None:
    model, tokenizer = pruned_reference
    path = tmp_path / f"pruned-{outtype}.gguf"
    written = export_gguf(model, path, tokenizer=tokenizer, outtype=outtype)
    assert written.arch == "deci" and len(set(written.feed_forward_length)) > 1
    assert written.padded_ffn_layers == [5]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_batch=256, logits_all=True,
                          verbose=False, seed=0)
    assert llm.n_vocab() == model.config.vocab_size
    diffs, agree = [], []
    for prompt in PROMPTS:
        ours = _hf_next_logits(model, tokenizer, prompt)
        theirs = _llama_next_logits(llm, tokenizer, prompt)
        diffs.append(float(np.abs(ours - theirs).max()))
        agree.append(int(ours.argmax()) == int(theirs.argmax()))
    print(f"\nllama.cpp {llama_cpp.__version__} vs transformers, {outtype}: max |logit diff| per prompt "
          f"{[round(d, 4) for d in diffs]}, top-1 agreement {sum(agree)}/{len(agree)}")
    assert all(agree)
    assert max(diffs) < max_diff
    # the tokenizer travels in the file: llama.cpp tokenizes like transformers
    for prompt in PROMPTS[:3]:
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == \
            tokenizer(prompt, add_special_tokens=False).input_ids

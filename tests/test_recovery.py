"""LoRA fine-tuning (lorashear.recovery) on tiny random Llamas: learning, merge, determinism, validation."""

from __future__ import annotations

import pytest
import torch

from lorashear.config import config_from_dict
from lorashear.errors import ConfigError, DataError
from lorashear.models.lora import LoraSettings
from lorashear.recovery import FinetuneConfig, finetune, lora_finetune
from tiny_models import tiny_model

#: the tiny Llama of this file (hidden 32, 4 heads / 2 KV heads, MLP 64, tied embeddings): wider embeddings
#: than the 0.02 default, so that LoRA alone can fit the text
RECOVERY_MODEL = dict(size="small", max_position_embeddings=128, tie_word_embeddings=True, vector_std=None,
                      embed_std=0.2, dtype=None)
TEXT = "the cat sat on the mat. "


def char_tokenizer():
    """A character-level fast tokenizer built in memory (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(TEXT + "abcdefghijklmnopqrstuvwxyz .,"))
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def texts() -> list[str]:
    return [TEXT * 12 for _ in range(6)]


def test_loss_goes_down_on_repeated_text(tok):
    model = tiny_model("llama", vocab=len(tok), **RECOVERY_MODEL)
    cfg = config_from_dict(FinetuneConfig, {"steps": 30, "batch_size": 2, "seq_len": 32, "lr": 1e-2,
                                            "lora_dropout": 0.0, "progress": False})
    assert cfg.lora == LoraSettings(dropout=0.0) and cfg.train.steps == 30
    # LoRA on every projection: r * (in + out) trainable parameters per linear layer, lm_head excluded
    lora_params = cfg.lora.r * sum(m.in_features + m.out_features for n, m in model.named_modules()
                                   if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    result = finetune(model, tok, texts(), cfg)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert len(result.losses) == 30
    assert last < 0.5 * first, (first, last)
    assert result.tokens_seen == 30 * 2 * 32 == cfg.budget_tokens
    assert result.trainable_params == lora_params


def test_lora_is_merged_and_no_peft_module_remains(tok):
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    model = tiny_model("llama", vocab=len(tok), **RECOVERY_MODEL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, len(tok), (4, 16), generator=torch.Generator().manual_seed(0))
    out = lora_finetune(model, tok, texts(), steps=5, batch_size=2, seq_len=32, lr=1e-2, progress=False)
    assert type(out) is LlamaForCausalLM
    assert not any(isinstance(m, LoraLayer) for m in out.modules())
    assert not any("lora" in n or "base_layer" in n for n, _ in out.named_parameters())
    assert not hasattr(out, "peft_config")
    assert set(dict(out.named_parameters())) == set(before)
    after = dict(out.named_parameters())
    # every LoRA target received its merged update; the (tied) embedding and the norms did not change
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        key = f"model.layers.0.self_attn.{name}.weight" if "proj" in name and name[0] in "qkvo" \
            else f"model.layers.0.mlp.{name}.weight"
        assert not torch.equal(after[key], before[key]), key
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])
    with torch.no_grad():
        assert out(input_ids=ids).logits.isfinite().all()
    # a merged model can be fine-tuned again (the dynamic recovery stage does rounds)
    again = lora_finetune(out, None, ids, steps=1, batch_size=2, seq_len=16, progress=False)
    assert not any(isinstance(m, LoraLayer) for m in again.modules())


def test_same_seed_gives_identical_weights(tok):
    def run(seed):
        model = tiny_model("llama", vocab=len(tok), **RECOVERY_MODEL)
        return lora_finetune(model, tok, texts(), steps=4, batch_size=2, seq_len=32, dropout=0.1, seed=seed,
                             progress=False).state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_caller_rng_state_is_untouched(tok):
    model = tiny_model("llama", vocab=len(tok), **RECOVERY_MODEL)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    lora_finetune(model, tok, texts(), steps=1, batch_size=1, seq_len=32, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_works_on_a_pruned_model_with_per_layer_widths():
    import lorashear

    model = tiny_model("llama", vocab=64, **RECOVERY_MODEL)
    graph = lorashear.discover(model)
    drop = [g for g in graph.prunable() if g.kind == "mlp_channel" and g.layer == 0][:20]
    small = lorashear.compact(model, drop)
    assert small.model.layers[0].mlp.gate_proj.out_features != small.model.layers[1].mlp.gate_proj.out_features
    ids = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0))
    out = lora_finetune(small, None, ids, steps=3, batch_size=2, seq_len=16, progress=False)
    assert out.model.layers[0].mlp.gate_proj.out_features == 64 - 20


@pytest.mark.parametrize("bad", [{"steps": 0}, {"batch_size": 0}, {"seq_len": 1}, {"lr": 0.0},
                                 {"lr_scheduler": "step"}, {"num_sequences": 0}])
def test_config_validation(bad):
    values = {"steps": 1, "batch_size": 1, "seq_len": 8} | bad
    with pytest.raises(ConfigError):
        config_from_dict(FinetuneConfig, values)


@pytest.mark.parametrize("bad", [{"r": 0}, {"alpha": 0}, {"dropout": 1.0}])
def test_lora_options_validated(bad):
    with pytest.raises(ConfigError):
        lora_finetune(None, None, torch.zeros(2, 8, dtype=torch.long), steps=1, batch_size=1, seq_len=8, **bad)


def test_bad_inputs_raise_lorashear_errors(tok):
    model = tiny_model("llama", vocab=len(tok), **RECOVERY_MODEL)
    with pytest.raises(ConfigError):  # packed width differs from seq_len
        lora_finetune(model, tok, torch.zeros(2, 16, dtype=torch.long), steps=1, batch_size=1, seq_len=8)
    with pytest.raises(DataError):  # stream shorter than one sequence
        lora_finetune(model, tok, torch.zeros(5, dtype=torch.long), steps=1, batch_size=1, seq_len=8)
    with pytest.raises(ConfigError):  # unknown option
        lora_finetune(model, tok, texts(), steps=1, batch_size=1, seq_len=8, not_an_option=3)
    with pytest.raises(ConfigError):  # no LoRA target in the model
        lora_finetune(model, tok, texts(), steps=1, batch_size=1, seq_len=8, targets=("nope",))

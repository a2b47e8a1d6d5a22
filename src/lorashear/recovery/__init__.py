"""Knowledge recovery: LoRA fine-tuning of a (pruned) model, merged back into plain weights.

:func:`lora_finetune` is the building block of the dynamic recovery stage (METHOD §5)
and the "same recovery budget" used to compare pruning methods::

    from lorashear.recovery import lora_finetune
    model = lora_finetune(model, tokenizer, texts, steps=100, batch_size=4, seq_len=256)
"""

from .finetune import (
    FinetuneConfig,
    FinetuneResult,
    finetune,
    lora_finetune,
)

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "lora_finetune"]

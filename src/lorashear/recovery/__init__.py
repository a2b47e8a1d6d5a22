"""Knowledge recovery: LoRA fine-tuning of a (pruned) model, merged back into plain weights.

:func:`lora_finetune` is the building block of the dynamic recovery stage (METHOD §5,
:mod:`lorashear.stages.recover`) and the "same recovery budget" used to compare pruning methods::

    from lorashear.recovery import lora_finetune
    model = lora_finetune(model, tokenizer, texts, steps=100, batch_size=4, seq_len=256)

The dynamic data adaptor's parts: :mod:`.sources` (one data spec per source: cleaning, held-out
split, packing, validation loss) and :mod:`.mixing` (degradation -> sampling weights -> a subset).
"""

from .finetune import (
    FinetuneConfig,
    FinetuneResult,
    finetune,
    lora_finetune,
)
from .mixing import allocate, degradation, sample_subset, sampling_weights
from .sources import Source, SourceConfig, clean_text, load_source, source_losses

__all__ = ["FinetuneConfig", "FinetuneResult", "Source", "SourceConfig", "allocate", "clean_text", "degradation",
           "finetune", "load_source", "lora_finetune", "sample_subset", "sampling_weights", "source_losses"]

"""Stages: each a module with a ``Config`` dataclass and ``run(config) -> Result``.

``analyze`` (knowledge distribution), ``prune`` (LHSPG + compaction), ``recover``
(dynamic knowledge recovery), ``evaluate`` (perplexity, zero-shot tasks, speed), ``export``
(GGUF for llama.cpp), ``groups`` (the removable structures) and ``pipeline`` (analyze ->
prune -> [recover] -> evaluate in order). Stages call components; commands and the
pipeline call stages.
"""

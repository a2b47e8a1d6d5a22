"""Stages: each a module with a ``Config`` dataclass and ``run(config) -> Result``.

``analyze`` (knowledge distribution), ``prune`` (LHSPG + compaction), ``recover``
(dynamic knowledge recovery), ``evaluate`` (perplexity, zero-shot tasks, speed) and
``pipeline`` (analyze, prune and evaluate in order; ``recover`` is not wired in yet).
Stages call components; commands and the pipeline call stages.
"""

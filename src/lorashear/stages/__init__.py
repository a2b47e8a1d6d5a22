"""Stages: each a module with a ``Config`` dataclass and ``run(config) -> Result``.

``analyze`` (knowledge distribution), ``prune`` (LHSPG + compaction), ``evaluate``
(perplexity, zero-shot tasks, speed) and ``pipeline`` (all of them in order).
Stages call components; commands and the pipeline call stages.
"""

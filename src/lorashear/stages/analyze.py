"""The analyze stage: knowledge distribution analysis (paper Alg. 3) on a model.

Recipe (each step a component)::

    tokens = build_eval_tokens(tokenizer, config.knowledge)   # packed training-side text
    model = load_model(config.model); graph = discover(model)
    result = analyze_knowledge(model, graph, tokens, config.knowledge)
    result.save(out); plot_knowledge(result, out / "knowledge.png")

``config.out`` then holds ``knowledge.json`` (deviations, ranking, unprunable node
groups, data protocol, config), ``knowledge.png`` (heatmap by layer and block) and
``analyze_result.json`` (the :class:`AnalyzeResult` summary).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..atomic import atomic_directory, atomic_write_json, output_lock, validate_out
from ..config import section, to_json_dict
from ..errors import ConfigError, DataError
from ..knowledge.config import KnowledgeConfig
from ..recipes import ANALYZE_RECIPES, DEFAULT_RECIPE

logger = logging.getLogger(__name__)

RESULT_FILE = "analyze_result.json"
PLOT_FILE = "knowledge.png"
#: files that mark a directory as an analyze stage's output (it may then be replaced)
OWNER_FILES = ("knowledge.json", RESULT_FILE)


@dataclass
class AnalyzeConfig:
    """Everything ``lorashear analyze`` needs: the model, where to write, and the analysis settings."""

    RECIPES: ClassVar[dict[str, dict[str, Any]]] = ANALYZE_RECIPES

    model: str = field(default="", metadata={"help": "model name, hub id or directory", "cli": False})
    out: str = field(default="", metadata={"help": "output directory (knowledge.json, knowledge.png)",
                                           "cli": False})
    dtype: str = field(default="float32", metadata={"help": "parameter dtype of the model"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cpu)"})
    recipe: str = field(default=DEFAULT_RECIPE, metadata={
        "help": f"preset of defaults for every option not given: {', '.join(ANALYZE_RECIPES)} (see lorashear.recipes)"})
    knowledge: KnowledgeConfig = section(KnowledgeConfig, help="knowledge distribution analysis")


@dataclass
class AnalyzeResult:
    """What the analyze stage produced (saved as ``analyze_result.json``)."""

    out: str
    knowledge_json: str
    knowledge_png: str
    model: str
    num_node_groups: int
    #: unprunable node groups as ``[layer, block]``, most sensitive first
    unprunable: list[list[Any]]
    #: their names (``layer3.mlp``), in the same order
    unprunable_names: list[str]
    #: their scores, in the same order (``None``: not finite)
    unprunable_scores: list[float | None]
    gamma: float
    full_perplexity: float | None
    eval_sequences: int
    eval_seq_len: int
    forward_passes: int
    analysis_seconds: float
    wall_time_s: float
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def build_eval_tokens(tokenizer, config: KnowledgeConfig):
    """The evaluation set: ``config.num_sequences`` packed sequences of ``config.seq_len`` tokens."""
    from ..data import load_texts, pack_texts

    spec = config.data.strip().lower()
    if spec.startswith("builtin:heldout") or any(f":split={s}" in spec for s in ("validation", "test", "heldout")):
        logger.warning("%s looks like held-out evaluation text; the analysis should use training-side "
                       "text (e.g. builtin:calibration) so reported results stay unbiased", config.data)
    texts = [t for t in load_texts(config.data) if t and t.strip()]
    if not texts:
        raise DataError(f"data source {config.data!r} produced no text")
    tokens = pack_texts(texts, tokenizer, config.seq_len, num_sequences=config.num_sequences, seed=config.seed)
    if tokens.numel() == 0 or tokens.shape[0] == 0:
        raise DataError(f"data source {config.data!r} is too short for one sequence of {config.seq_len} tokens")
    if tokens.shape[0] < config.num_sequences:
        logger.warning("data source %r filled only %d of %d sequences", config.data, tokens.shape[0],
                       config.num_sequences)
    return tokens


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def check_config(config: AnalyzeConfig) -> None:
    """What can be checked before any model loads: the analysis text reads as text."""
    from ..data import check_texts

    check_texts(config.knowledge.data)


def run(config: AnalyzeConfig, *, model: Any = None, tokenizer: Any = None) -> AnalyzeResult:
    """Run the knowledge analysis and write its outputs to ``config.out``.

    ``model``/``tokenizer`` may be given directly (tests, notebooks); otherwise they are
    loaded from ``config.model``. The tokenizer (and the data) load before the model,
    so a bad data source fails before the model's weights are read. ``config.out`` is
    checked and locked first; the outputs replace it as a whole once all are written.
    """
    out = validate_out(config.out, owner_files=OWNER_FILES)
    if not config.model and (model is None or tokenizer is None):
        raise ConfigError("name the model to analyze (MODEL, or `model:` in --config)")
    if model is None:
        from ..models.loading import check_causal_lm

        check_causal_lm(config.model)
    with output_lock(out):
        return _run(config, out, model=model, tokenizer=tokenizer)


def _run(config: AnalyzeConfig, out: Path, *, model: Any, tokenizer: Any) -> AnalyzeResult:
    from ..graph.discover import discover
    from ..knowledge import analyze_knowledge, plot_knowledge
    from ..models.loading import check_tokenizer_fits

    kcfg = config.knowledge
    t_start = time.perf_counter()
    if tokenizer is None:
        from ..models.loading import load_tokenizer

        tokenizer = load_tokenizer(config.model)
    tokens = build_eval_tokens(tokenizer, kcfg)
    if model is None:
        from ..models.loading import load_model

        model = load_model(config.model, dtype=config.dtype, device=config.device)
    check_tokenizer_fits(model, tokenizer, config.model)
    model_name = config.model or type(model).__name__
    graph = discover(model)
    result = analyze_knowledge(
        model, graph, tokens, kcfg, model_name=model_name,
        data_info={"spec": kcfg.data, "seed": kcfg.seed, "role": "evaluation set drawn from training-side text"},
    )
    top = result.unprunable_node_groups()
    json_path, png_path = out / "knowledge.json", out / PLOT_FILE
    analyzed = AnalyzeResult(
        out=str(out), knowledge_json=str(json_path), knowledge_png=str(png_path), model=model_name,
        num_node_groups=len(result.node_groups),
        unprunable=[[n.layer, n.block] for n in top], unprunable_names=[n.name for n in top],
        unprunable_scores=[_finite(n.score) for n in top], gamma=kcfg.gamma,
        full_perplexity=_finite(result.full_perplexity),
        eval_sequences=int(tokens.shape[0]), eval_seq_len=int(tokens.shape[1]),
        forward_passes=result.forward_passes, analysis_seconds=result.seconds,
        wall_time_s=time.perf_counter() - t_start, settings=to_json_dict(config))
    with atomic_directory(out) as tmp:  # complete in a temporary sibling, then swapped in as a whole
        result.save(tmp)
        plot_knowledge(result, tmp / PLOT_FILE)
        atomic_write_json(tmp / RESULT_FILE, analyzed.summary())
    logger.info("wrote %s, %s and %s", json_path, png_path, out / RESULT_FILE)
    return analyzed

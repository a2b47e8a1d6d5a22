"""Offline zero-shot tasks: BIG-bench JSON tasks converted for lm-eval.

The hubs that lm-eval normally downloads its tasks from are not always reachable.
The ``bigbench`` sdist on PyPI ships the BIG-bench JSON tasks, many of them
multiple choice (``target_scores``). :func:`prepare_eval_data` converts a curated
list of them (``resources/tasks/bigbench.yaml``), once, into JSONL files in the
user cache; :func:`write_task_yamls` writes lm-eval task YAMLs that point at
those files, for ``TaskManager(include_path=...)``.

Prompt format (BIG-bench's own ``default_format_fn``, zero-shot)::

    task_prefix + example_input_prefix + input
        [+ choice_prefix + choice_1 + choice_prefix + choice_2 ...]   # if append_choices_to_input
        + example_output_prefix

Defaults: input prefix ``"\\nQ: "``, output prefix ``"\\nA: "``, choice prefix
``"\\n  choice: "``, choices appended. Choices are listed in sorted order (BIG-bench
permutes them with a seeded RNG; any fixed order that does not depend on the gold
answer is equivalent). Each choice is scored as a continuation of the prompt; a
prompt ending in a space has it moved into lm-eval's ``target_delimiter``, so the
choice is tokenised with its leading space as in running text. The gold answer is
the choice with the highest ``target_scores`` value (the first one on ties).

BIG-bench data carry a canary string: they are for evaluation only, never for
training. The converted files keep it (``manifest.json`` and ``README.md``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory, atomic_write_json, atomic_write_text
from ..errors import DataError
from ..paths import cache_root

logger = logging.getLogger(__name__)

#: Prefix of the lm-eval task names lorashear ships (``lorashear_bb_winowhy``).
TASK_PREFIX = "lorashear_bb_"
#: Name of the default offline suite (expands to the tasks listed in ``default_suite``).
DEFAULT_SUITE = "lorashear_bigbench"
#: Every converted offline task.
ALL_SUITE = "lorashear_bigbench_all"
#: Bump when the conversion changes: prepared data with another version is rebuilt.
FORMAT_VERSION = 2
#: Environment variable naming an already downloaded ``bigbench-1.0.0.tar.gz``.
SDIST_ENV = "LORASHEAR_BIGBENCH_SDIST"

_BIGBENCH_DEFAULTS = {
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
    "task_prefix": "",
}


@dataclass(frozen=True)
class ConvertedTask:
    """One BIG-bench JSON task in lm-eval's document format."""

    name: str
    docs: list[dict[str, Any]]
    target_delimiter: str
    canary: str

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


@lru_cache(maxsize=1)
def bigbench_spec() -> dict[str, Any]:
    """The shipped task list (``lorashear/resources/tasks/bigbench.yaml``)."""
    import yaml

    text = resources.files("lorashear").joinpath("resources/tasks/bigbench.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def lm_eval_template() -> dict[str, Any]:
    """The shipped lm-eval task template (``resources/tasks/lm_eval_template.yaml``)."""
    import yaml

    text = resources.files("lorashear").joinpath("resources/tasks/lm_eval_template.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def offline_task_names(suite: str = ALL_SUITE) -> list[str]:
    """lm-eval names of the offline tasks in ``suite`` (default suite or all)."""
    spec = bigbench_spec()
    names = spec["default_suite"] if suite == DEFAULT_SUITE else list(spec["tasks"])
    return [TASK_PREFIX + n for n in names]


def known_offline_task_names() -> set[str]:
    """lm-eval names of the offline tasks that exist: those prepared, else those the shipped spec lists."""
    manifest = read_manifest(prepared_data_dir())
    names = manifest["tasks"] if manifest is not None else bigbench_spec()["tasks"]
    return {TASK_PREFIX + n for n in names}


def is_offline_task(name: str) -> bool:
    return name in (DEFAULT_SUITE, ALL_SUITE) or name.startswith(TASK_PREFIX)


def expand_task_names(names: Iterable[str]) -> list[str]:
    """Expand the offline suite names; keep every other name (lm-eval registry tasks) as given.

    Duplicates are dropped, order is kept.
    """
    out: list[str] = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        expanded = offline_task_names(name) if name in (DEFAULT_SUITE, ALL_SUITE) else [name]
        for n in expanded:
            if n not in out:
                out.append(n)
    return out


# --------------------------------------------------------------------- conversion


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


def write_jsonl(path: str | os.PathLike[str], docs: Sequence[Mapping[str, Any]]) -> str:
    """Write ``docs`` as JSONL (atomically); return the SHA-256 of the file."""
    text = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
    atomic_write_text(path, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def task_yaml(name: str, jsonl_path: str | os.PathLike[str], *, target_delimiter: str = " ",
              tag: str | Sequence[str] | None = None, description: str | None = None) -> dict[str, Any]:
    """The lm-eval task config (as a dict) for a converted JSONL file."""
    config = lm_eval_template()
    config = {"task": name, **config}
    if tag:
        config["tag"] = [tag] if isinstance(tag, str) else list(tag)
    config["dataset_kwargs"] = {"data_files": {"test": str(Path(jsonl_path).resolve())}}
    config["target_delimiter"] = target_delimiter
    if description:
        config.setdefault("metadata", {})["description"] = description
    return config


def write_task_yamls(out_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None,
                     names: Iterable[str] | None = None) -> list[str]:
    """Write one lm-eval YAML per prepared offline task into ``out_dir``; return the task names.

    ``data_dir`` is a prepared directory (default: :func:`prepared_data_dir`); ``names``
    restricts to these lm-eval task names. The YAMLs hold absolute paths, so they are
    written fresh for each evaluation rather than cached.
    """
    import yaml

    data_dir = Path(data_dir) if data_dir is not None else prepared_data_dir()
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise DataError(f"{data_dir} holds no prepared offline tasks; run prepare_eval_data()")
    wanted = set(names) if names is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    default = set(manifest.get("default_suite", []))
    for short, info in manifest["tasks"].items():
        full = TASK_PREFIX + short
        if wanted is not None and full not in wanted:
            continue
        tags = [ALL_SUITE] + ([DEFAULT_SUITE] if short in default else [])
        config = task_yaml(full, data_dir / info["file"], target_delimiter=info["target_delimiter"], tag=tags,
                           description=None)
        config["metadata"]["source"] = info.get("source", "")
        (out / f"{full}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
        written.append(full)
    return written


# ---------------------------------------------------------------------- prepare


def prepared_data_dir() -> Path:
    """Where :func:`prepare_eval_data` puts the converted tasks."""
    version = bigbench_spec()["source"]["version"]
    return cache_root() / "tasks" / f"bigbench-{version}"


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
    """Chance accuracy of every prepared offline task, keyed by lm-eval task name."""
    manifest = read_manifest(data_dir if data_dir is not None else prepared_data_dir())
    if manifest is None:
        return {}
    return {TASK_PREFIX + k: v["chance"] for k, v in manifest["tasks"].items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


#: pip release used to fetch the sdist. Newer pip refuses to download it at all, because
#: its metadata declares a local-file dependency (``bleurt @ file://...``); this one does not.
DOWNLOAD_PIP = "pip==23.2.1"


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the sdist (never installed: it would pull heavy dependencies).

    First with :data:`DOWNLOAD_PIP`, itself fetched with ``pip download`` as a wheel and run
    from the wheel (``python pip.whl/pip ...``, as pip documents), then with this pip.
    """
    source = bigbench_spec()["source"]
    requirement = f"{source['package']}=={source['version']}"
    logger.info("downloading the %s sdist from PyPI with pip (about 360 MB, not installed)", requirement)
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
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            message = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else message)
            logger.debug("%s failed: %s", " ".join(cmd), message)
    finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)
    raise DataError(f"could not download the {requirement} sdist with pip ({message}); download "
                    f"{source['sdist']} by hand and pass it as prepare_eval_data(sdist=...) or ${SDIST_ENV}")


def _find_sdist(sdist: str | os.PathLike[str] | None, download_dir: Path) -> tuple[Path, bool]:
    """Return (path, downloaded_by_us)."""
    name = bigbench_spec()["source"]["sdist"]
    for candidate in (sdist, os.environ.get(SDIST_ENV)):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_dir():
                path = path / name
            if not path.is_file():
                raise DataError(f"BIG-bench sdist {path} does not exist")
            return path, False
    cached = download_dir / name
    if cached.is_file():
        return cached, False
    download_dir.mkdir(parents=True, exist_ok=True)
    return _download_sdist(download_dir), True


def write_prepared_dir(final: str | os.PathLike[str], converted: Mapping[str, ConvertedTask], *,
                       source: Mapping[str, Any], default_suite: Sequence[str],
                       categories: Mapping[str, str] | None = None, paths: Mapping[str, str] | None = None,
                       shuffle_seed: int | None = None) -> Path:
    """Write converted tasks as ``data/<name>.jsonl`` + ``manifest.json`` + ``README.md``,
    atomically (the directory appears complete or not at all)."""
    final = Path(final)
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
                "category": (categories or {}).get(name, ""),
                "source": f"{label}:{(paths or {}).get(name, name)}",
            }
        atomic_write_json(tmp / "manifest.json", {
            "format_version": FORMAT_VERSION,
            "source": dict(source),
            "shuffle_seed": shuffle_seed,
            "canary": canary,
            "default_suite": list(default_suite),
            "tasks": tasks_info,
        })
        atomic_write_text(tmp / "README.md", (
            "# Offline evaluation tasks (lorashear)\n\n"
            f"Converted from {label} by `lorashear.evaluation.prepare_eval_data()`.\n\n"
            f"{canary}\n\nEvaluation only: never train on these files.\n"))
    return final


def prepare_eval_data(*, sdist: str | os.PathLike[str] | None = None, force: bool = False,
                      keep_sdist: bool = False) -> Path:
    """Convert the offline tasks into the user cache, once; return the prepared directory.

    Idempotent: a complete directory of the current format is left as it is (unless
    ``force``). The sdist comes from ``sdist``, ``$LORASHEAR_BIGBENCH_SDIST``, the cache, or
    ``pip download`` (PyPI); its SHA-256 is checked. A sdist downloaded here is deleted
    after conversion unless ``keep_sdist``. The output directory appears atomically.
    """
    spec = bigbench_spec()
    final = prepared_data_dir()
    if not force and read_manifest(final) is not None:
        logger.info("offline tasks already prepared in %s", final)
        return final
    download_dir = cache_root() / "downloads"
    path, downloaded = _find_sdist(sdist, download_dir)
    digest = _sha256(path)
    if digest != spec["source"]["sha256"]:
        raise DataError(f"{path} has SHA-256 {digest}, expected {spec['source']['sha256']} "
                        f"({spec['source']['package']}=={spec['source']['version']})")
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
                       shuffle_seed=spec.get("shuffle_seed", 1234))
    if downloaded and not keep_sdist:
        path.unlink(missing_ok=True)
    logger.info("prepared %d offline tasks in %s", len(converted), final)
    return final


def ensure_eval_data() -> Path:
    """Return the prepared directory, or raise a :class:`DataError` that says how to prepare it."""
    final = prepared_data_dir()
    if read_manifest(final) is None:
        raise DataError(
            "the offline tasks are not prepared; run "
            "`python -c 'from lorashear.evaluation import prepare_eval_data; prepare_eval_data()'` "
            "(downloads the bigbench sdist from PyPI once)")
    return final


def temporary_task_dir(names: Iterable[str]) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory holding YAMLs for the offline tasks among ``names``.

    Raises :class:`DataError` if offline tasks are asked for but not prepared.
    """
    tmp = tempfile.TemporaryDirectory(prefix="lorashear-tasks-")
    offline = [n for n in names if is_offline_task(n)]
    if offline:
        data_dir = ensure_eval_data()
        write_task_yamls(tmp.name, data_dir, names=offline)
    return tmp


__all__ = [
    "ALL_SUITE",
    "DEFAULT_SUITE",
    "TASK_PREFIX",
    "ConvertedTask",
    "bigbench_spec",
    "convert_bigbench_task",
    "ensure_eval_data",
    "expand_task_names",
    "known_offline_task_names",
    "offline_task_names",
    "prepare_eval_data",
    "prepared_data_dir",
    "read_manifest",
    "task_chance",
    "task_yaml",
    "write_jsonl",
    "write_prepared_dir",
    "write_task_yamls",
]


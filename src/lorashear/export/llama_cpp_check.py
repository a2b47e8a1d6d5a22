"""Does the installed llama.cpp run a GGUF file on this CPU? A probe in a subprocess.

:func:`probe_llama_cpp` loads the file with llama-cpp-python in a child process and evaluates a
2-token prompt (a batch of two rows, which takes ggml's batched matmul kernels; a single token
takes other ones). A crash there (a segmentation fault, an illegal instruction) kills the child,
not the caller, and comes back as a one-line :class:`LlamaCppCheck` that names the cause and what
to do.

The crash it was written for: llama-cpp-python built natively on a CPU with AMX compiles in
ggml's AMX kernels, and with GCC 12 their tile configuration (a struct on the stack handed to
``_tile_loadconfig``, whose asm declares an 8-byte operand) loses its stores to dead-store
elimination, so ``ldtilecfg`` loads stack garbage: SIGSEGV (or SIGILL) in
``ggml_backend_amx_mul_mat`` on the first prompt of two or more tokens with a quantised model
(Q8_0, Q4_x). ``scripts/setup.sh`` builds it without AMX (:data:`NO_AMX_FLAGS`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: tokens the probe evaluates in one batch (two or more take the batched matmul kernels)
PROBE_TOKENS = 2
#: seconds the probe may take (loading the file included) before it is given up as inconclusive
DEFAULT_TIMEOUT_S = 300.0
#: compiler flags that keep ggml's AMX kernels out of a native llama-cpp-python build
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
#: how to rebuild llama-cpp-python without AMX, in one line
REBUILD_HINT = (f"rebuild it without AMX: bash scripts/setup.sh, or CFLAGS='{NO_AMX_FLAGS}' "
                f"CXXFLAGS='{NO_AMX_FLAGS}' pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python")

#: check results: ``ok``; ``crashed`` (killed by a signal); ``failed`` (an error, or non-finite
#: logits); ``timeout`` and ``skipped`` (llama-cpp-python not installed) say nothing about the file
STATUSES: tuple[str, ...] = ("ok", "crashed", "failed", "timeout", "skipped")

# The child: print what llama.cpp was built with (before anything can crash), then load and evaluate.
_PROBE_SCRIPT = r"""
import json, math, sys
import llama_cpp
print(json.dumps({"version": llama_cpp.__version__,
                  "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()}),
      flush=True)
path, n_tokens, n_threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=max(16, n_tokens), n_batch=max(16, n_tokens), n_threads=n_threads,
                      logits_all=True, verbose=False)
n_vocab = llm.n_vocab()
ids = llm.tokenize(b"The capital of France is", add_bos=False)[:n_tokens]
ids += [(i + 1) % n_vocab for i in range(n_tokens - len(ids))]
llm.eval(ids)
row = [float(x) for x in llm.scores[llm.n_tokens - 1]]
print(json.dumps({"evaluated": len(ids), "finite": all(map(math.isfinite, row)), "nonzero": any(row)}), flush=True)
"""


@dataclass
class LlamaCppCheck:
    """What :func:`probe_llama_cpp` found (``message`` is one line)."""

    status: str                      #: one of :data:`STATUSES`
    message: str
    seconds: float = 0.0
    version: str | None = None       #: llama-cpp-python's version
    system_info: str | None = None   #: ``llama_print_system_info()`` of that build
    returncode: int | None = None    #: the child's exit status (negative: the signal that killed it)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def has_amx(self) -> bool:
        """The build has ggml's AMX kernels (``AMX_INT8 = 1``)."""
        return "AMX_INT8 = 1" in (self.system_info or "")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def llama_cpp_installed() -> bool:
    """llama-cpp-python can be imported (without importing it: that loads the library)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _parse_stdout(stdout: str) -> tuple[dict[str, object], dict[str, object] | None]:
    """``(build info, evaluation result or None)`` from the child's JSON lines."""
    records = []
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    build = next((r for r in records if "system_info" in r), {})
    evaluated = next((r for r in records if "evaluated" in r), None)
    return build, evaluated


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _crash_message(name: str, returncode: int, check: LlamaCppCheck) -> str:
    what = (f"llama.cpp (llama-cpp-python {check.version or '?'}) crashed with {_signal_name(returncode)} "
            f"evaluating a {PROBE_TOKENS}-token prompt of {name} on this CPU (the file is written; this build "
            "cannot run it)")
    if check.has_amx:
        return (f"{what}: its build has ggml's AMX kernels (AMX_INT8 = 1), which crash on prompts of two or more "
                f"tokens with quantised weights (GCC 12 miscompiles their tile configuration); {REBUILD_HINT}")
    return f"{what} (f16/f32 may run; a newer or rebuilt llama-cpp-python may too)"


def _classify(name: str, proc: subprocess.CompletedProcess[str], seconds: float) -> LlamaCppCheck:
    build, evaluated = _parse_stdout(proc.stdout or "")
    check = LlamaCppCheck(status="ok", message="", seconds=seconds, returncode=proc.returncode,
                          version=str(build["version"]) if "version" in build else None,
                          system_info=str(build["system_info"]) if "system_info" in build else None)
    if proc.returncode < 0:
        check.status, check.message = "crashed", _crash_message(name, proc.returncode, check)
    elif proc.returncode != 0 or evaluated is None:
        check.status = "failed"
        check.message = (f"llama.cpp (llama-cpp-python {check.version or '?'}) cannot run {name} "
                         f"(exit code {proc.returncode}): {_last_line(proc.stderr or '')}")
    elif not (evaluated.get("finite") and evaluated.get("nonzero")):
        check.status = "failed"
        check.message = (f"llama.cpp (llama-cpp-python {check.version or '?'}) ran {name} but its logits are "
                         f"{'not finite (NaN or inf)' if not evaluated.get('finite') else 'all zero'}")
    else:
        check.message = (f"llama.cpp (llama-cpp-python {check.version}) evaluates a {PROBE_TOKENS}-token prompt "
                         f"of {name} ({seconds:.1f} s)")
    return check


def probe_llama_cpp(path: str | os.PathLike[str], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                    n_threads: int | None = None) -> LlamaCppCheck:
    """Load ``path`` in llama.cpp in a subprocess and evaluate a :data:`PROBE_TOKENS`-token prompt.

    Never raises for what the child does: a crash, an error or a timeout comes back as the
    check's ``status`` and one-line ``message``. ``skipped`` when llama-cpp-python is not installed.
    """
    path = Path(path)
    if not llama_cpp_installed():
        return LlamaCppCheck(status="skipped", message="llama-cpp-python is not installed; the llama.cpp check "
                                                       "was skipped")
    threads = n_threads or max(1, min(2, os.cpu_count() or 1))
    argv = [sys.executable, "-c", _PROBE_SCRIPT, str(path), str(PROBE_TOKENS), str(threads)]
    # OpenMP's spin-waiting threads make a batch of two tokens take seconds on a busy CPU; passive waits don't
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False, env=env)
    except subprocess.TimeoutExpired:
        return LlamaCppCheck(status="timeout", seconds=time.perf_counter() - start,
                             message=f"the llama.cpp check of {path.name} did not finish in {timeout_s:.0f} s; "
                                     "it says nothing about the file")
    check = _classify(path.name, proc, time.perf_counter() - start)
    logger.debug("llama.cpp check of %s: %s (%s)", path, check.status, check.message)
    return check

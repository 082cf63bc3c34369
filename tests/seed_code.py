"""The paper's own code (github:fywalter/nudging, "the seed") loaded offline as an oracle.

Its modules are read from a local git mirror of the repository (`NUDGING_SEED_GIT`, by default
where the `fetch` tool puts it) and executed with stand-ins for what it needs at import time
and cannot have here: `tiktoken`'s GPT-3.5 encoding (it only measures the length budget;
the stand-in counts the simulator's tokens), the hub's `datasets`, and an OpenAI key file.
Tests that use it skip when the mirror is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from upstreams.simulator.tokenizer import tokenize

SEED_GIT = Path(os.environ.get("NUDGING_SEED_GIT", "/work/.mirror/fywalter+nudging/repo"))


def seed_source(path: str) -> str:
    """A file of the seed at its mirror's HEAD; skips the calling test without a mirror."""
    if not SEED_GIT.is_dir():
        pytest.skip(f"no mirror of the seed at {SEED_GIT} (set NUDGING_SEED_GIT)")
    shown = subprocess.run(
        ["git", f"--git-dir={SEED_GIT}", "show", f"HEAD:{path}"], capture_output=True, text=True, check=True
    )
    return shown.stdout


class _SimulatorEncoding:
    def encode(self, text: str) -> list[str]:
        return tokenize(text)


def _stand_ins() -> dict[str, types.ModuleType]:
    tiktoken = types.ModuleType("tiktoken")
    tiktoken.encoding_for_model = lambda _model: _SimulatorEncoding()  # type: ignore[attr-defined]
    hub = types.ModuleType("datasets")
    hub.load_dataset = lambda *_args, **_kwargs: pytest.fail("the seed oracle must not load from the hub")  # type: ignore[attr-defined]
    return {"tiktoken": tiktoken, "datasets": hub}


_loaded: dict[str, types.ModuleType] = {}


def seed_module(name: str, tmp_dir: Path) -> types.ModuleType:
    """The seed's `name`.py as a module (once per test session)."""
    if name in _loaded:
        return _loaded[name]
    source = seed_source(f"{name}.py")
    module = types.ModuleType(f"seed_{name}")
    module.__file__ = f"{SEED_GIT}:{name}.py"
    saved = {key: sys.modules.get(key) for key in ("tiktoken", "datasets")}
    sys.modules.update(_stand_ins())
    cwd = Path.cwd()
    # dataset_utils reads "openai-key.txt" from the working directory when imported.
    (tmp_dir / "openai-key.txt").write_text("sk-offline\n", encoding="utf-8")
    os.chdir(tmp_dir)
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102  # the oracle's code, read-only mirror
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    _loaded[name] = module
    return module

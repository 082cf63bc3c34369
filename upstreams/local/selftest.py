"""A start-up check that the installed llama.cpp can evaluate prompts on this CPU.

A llama.cpp built for the machine it was compiled on (pip's default, ``GGML_NATIVE``) may
kill the process on another CPU: SIGILL for instructions the CPU lacks, and SIGSEGV in some
CPU-specific kernels (seen with AMX and a Q4_1 model). Such a crash takes the whole server
down on its first real request, so the local upstream first evaluates a short multi-token
prompt, then a few tokens one at a time, with its own model, context and thread settings, in
a child process; on a crash it refuses to start and says how to rebuild.

``python -m upstreams.local.selftest PATH --ctx N --threads N`` is that child.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ..exits import describe_exit
from .generation import EngineError

# The build the Makefile makes (tests check that both say the same): no -march=native, the
# AVX2 baseline that every x86-64 server CPU of the last decade has.
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
REBUILD_COMMAND = (f"CMAKE_ARGS='{PORTABLE_CMAKE_ARGS}' pip install --no-cache-dir "
                   "--force-reinstall --no-deps llama-cpp-python")
# Several tokens in one batch (the prefill path, where the crash was seen), then single tokens.
PROMPT = "The quick brown fox jumps over the lazy dog, and then"
DECODE_STEPS = 4
TIMEOUT_SECONDS = 300.0


def self_test_command(path: Path, *, n_ctx: int, n_threads: int | None) -> list[str]:
    command = [sys.executable, "-m", "upstreams.local.selftest", str(path), "--ctx", str(n_ctx)]
    if n_threads is not None:
        command += ["--threads", str(n_threads)]
    return command


def run_self_test(command: Sequence[str], model: str, *, timeout: float = TIMEOUT_SECONDS) -> None:
    """Run the check in a child process; EngineError says why llama.cpp cannot serve here."""
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout,
                                check=False)
    except subprocess.TimeoutExpired:
        raise EngineError(f"llama.cpp did not evaluate a {len(PROMPT.split())}-word test prompt "
                          f"with {model} within {timeout:g} s") from None
    if result.returncode == 0:
        return
    details = result.stderr.strip()[-1500:]
    if result.returncode < 0:
        raise EngineError(
            f"llama.cpp {describe_exit(result.returncode)} evaluating a test prompt with "
            f"{model}: the installed llama-cpp-python build does not run on this CPU. Rebuild "
            f"it portable: {REBUILD_COMMAND} (or remove .venv and run make again).\n{details}"
        )
    raise EngineError(f"llama.cpp failed a test prompt with {model} "
                      f"({describe_exit(result.returncode)}):\n{details}")


def check_model(path: Path, *, n_ctx: int, n_threads: int | None) -> None:
    run_self_test(self_test_command(path, n_ctx=n_ctx, n_threads=n_threads), path.name)


def _evaluate(path: Path, n_ctx: int, n_threads: int | None) -> None:
    from .engine import LlamaCppModel

    with LlamaCppModel(path, n_ctx=n_ctx, n_threads=n_threads) as model:
        model.prefill(model.tokenize(PROMPT))
        for _ in range(DECODE_STEPS):
            model.advance(int(model.logits().argmax()))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m upstreams.local.selftest",
                                     description="Evaluate a test prompt with a GGUF model.")
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--ctx", type=int, required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    _evaluate(args.gguf, args.ctx, args.threads)


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # a crash prints where it happened, for the parent's message
    main()

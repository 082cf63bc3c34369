"""The llama.cpp build a user gets, and the local upstream's start-up check of it.

`make` builds llama-cpp-python portable, without pip's wheel cache (a cached wheel built
natively on another CPU crashed the demo); the local upstream evaluates a test prompt in a
child process before it serves and, when the build crashes, says how to rebuild.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from upstreams.exits import describe_exit

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("numpy", reason="the local upstream needs the demo extra")
from upstreams.local.generation import EngineError  # noqa: E402
from upstreams.local.selftest import PORTABLE_CMAKE_ARGS, REBUILD_COMMAND, run_self_test  # noqa: E402


def _crashing_child(signal_name: str) -> list[str]:
    return [sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), signal.{signal_name})"]


def test_makefile_builds_llama_cpp_portable_and_without_the_wheel_cache(tmp_path: Path) -> None:
    dry_run = subprocess.run(
        ["make", "-n", "-B", f"VENV={tmp_path / 'venv'}", f"{tmp_path / 'venv'}/.demo"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    llama = [i for i, line in enumerate(dry_run) if "llama-cpp-python" in line]
    extras = [i for i, line in enumerate(dry_run) if ".[dev,demo,eval]" in line]
    assert len(llama) == 1 and len(extras) == 1, dry_run
    line = dry_run[llama[0]]
    assert f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}"' in line
    assert "--no-cache-dir" in line
    # The project's own requirement, read from pyproject.toml, is what gets built.
    assert "'llama-cpp-python>=" in line
    assert llama[0] < extras[0], "llama.cpp must be built before the extras pull it in"
    assert "CMAKE_ARGS" not in dry_run[extras[0]]


def test_the_demo_extra_is_installed_after_the_lighter_test_install(tmp_path: Path) -> None:
    # `make test` installs without the demo extra, which also creates bin/nudging-proxy: `make
    # run` and `make test-all` after it must still install llama.cpp.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for made in (venv / ".dev", venv / "bin" / "nudging-proxy"):
        made.touch()
    for target in ("run", "test-all"):
        dry_run = subprocess.run(["make", "-n", f"VENV={venv}", target], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout
        assert "llama-cpp-python" in dry_run and ".[dev,demo,eval]" in dry_run, (target, dry_run)


def test_a_crash_in_the_check_refuses_to_serve_and_says_how_to_rebuild() -> None:
    with pytest.raises(EngineError) as raised:
        run_self_test(_crashing_child("SIGSEGV"), "model.gguf")
    message = str(raised.value)
    assert "llama.cpp was killed by SIGSEGV (exit status 139)" in message
    assert "model.gguf" in message
    assert REBUILD_COMMAND in message and PORTABLE_CMAKE_ARGS in message


def test_a_failing_check_reports_its_status_and_output() -> None:
    command = [sys.executable, "-c", "import sys; sys.exit('no such model')"]
    with pytest.raises(EngineError, match=r"exited with status 1\):\nno such model"):
        run_self_test(command, "model.gguf")


def test_a_passing_check_returns() -> None:
    run_self_test([sys.executable, "-c", "pass"], "model.gguf")


@pytest.mark.parametrize(("returncode", "described"), [
    (-11, "was killed by SIGSEGV (exit status 139)"),
    (-4, "was killed by SIGILL (exit status 132)"),
    (3, "exited with status 3"),
])
def test_exits_are_described_as_a_shell_does(returncode: int, described: str) -> None:
    assert describe_exit(returncode) == described


def test_amx_builds_are_recognised_from_llama_cpp_system_info() -> None:
    engine = pytest.importorskip("upstreams.local.engine", reason="llama-cpp-python is not installed")
    assert engine.uses_amx("CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |")
    assert not engine.uses_amx("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | REPACK = 1 |")


def test_the_local_upstream_refuses_to_start_when_its_check_fails(tmp_path: Path) -> None:
    """The real command on a file llama.cpp cannot load: it exits with the check's message."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    done = subprocess.run([sys.executable, "-m", "cli", "local-upstream", "--gguf", str(broken),
                           "--port", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "local-upstream: llama.cpp failed a test prompt with broken.gguf" in done.stderr


def test_the_image_install_script_builds_llama_cpp_with_the_same_portable_flags() -> None:
    script = (ROOT / "docker" / "install.sh").read_text()
    assert f': "${{CMAKE_ARGS:={PORTABLE_CMAKE_ARGS}}}"' in script
    assert script.count("--no-cache-dir") >= 2

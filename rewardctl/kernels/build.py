"""Compiling ``cpu_fused.cpp`` once per machine and loading the result in milliseconds afterwards.

Why a cache of our own rather than building at every run: torch's extension builder takes about 30 s
on a 2-core CPU, longer than many runs, so a run only ever loads an extension built before (by
``rewardctl kernels build`` or ``hardware.cpu_fused_kernels=true``). The cache key holds everything
the binary depends on (the source, torch's version, Python's, the CPU capability torch dispatches to
and the compiler flags), so an upgraded torch or another machine sharing the home directory gets a
build of its own rather than a crash. Loading imports the built module directly (no ninja call).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from rewardctl.errors import RewardctlError

SOURCE = Path(__file__).with_name("cpu_fused.cpp")

#: Compiler flags per CPU capability torch dispatches its own kernels to (``ATEN_CPU_CAPABILITY``), as
#: torch builds its AVX2 / AVX-512 kernels: the same ``Vectorized`` code paths, the same Sleef exp,
#: the same bf16 rounding. Not ``-march=native``: it would let the compiler use AVX512-BF16's
#: conversion instructions, which flush denormals unlike torch's own conversion.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
#: No fused multiply-add contraction: torch computes each product and sum as its own rounded operation.
BASE_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]


class KernelBuildError(RewardctlError):
    """The fused kernels could not be built (no compiler, no ninja, a compile error)."""


def capability() -> str:
    """The vector width torch's own CPU kernels use here: AVX512, AVX2 or DEFAULT (plain C++)."""
    found = torch.backends.cpu.get_cpu_capability()
    return found if found in CAPABILITY_FLAGS else "DEFAULT"


def compile_flags(cap: str | None = None) -> list[str]:
    cap = cap or capability()
    defines = [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"] if cap in CAPABILITY_FLAGS else []
    return [*BASE_FLAGS, *CAPABILITY_FLAGS.get(cap, []), *defines]


def cache_root() -> Path:
    """``$REWARDCTL_KERNELS_DIR``, else ``$XDG_CACHE_HOME/rewardctl/kernels`` (``~/.cache`` by default)."""
    explicit = os.environ.get("REWARDCTL_KERNELS_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rewardctl" / "kernels"


def extension_name() -> str:
    """The module name, unique to what the binary depends on (see the module docstring)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    python = f"{sys.version_info[0]}.{sys.version_info[1]}{sys.abiflags}"
    for part in (torch.__version__, torch.version.git_version, python, platform.machine()):
        key.update(part.encode())
    key.update(" ".join(compile_flags()).encode())
    return f"rewardctl_cpu_fused_{key.hexdigest()[:16]}"


def build_directory() -> Path:
    return cache_root() / extension_name()


def library_path() -> Path:
    name = extension_name()
    return build_directory() / f"{name}.so"


def is_built() -> bool:
    return library_path().is_file()


def load_built() -> ModuleType | None:
    """The built extension, or None when it has not been built for this torch, Python and CPU."""
    path = library_path()
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(extension_name(), path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ensure_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ``ninja`` wheel puts it in the venv's bin, which is
    not on PATH unless the venv is activated."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # the PyPI wheel of the build tool

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


#: Lines of a compiler's or ninja's output that say what went wrong (torch's message starts with the
#: command line it ran).
_ERROR_LINE = re.compile(r"error|not found|no such file|FAILED", re.IGNORECASE)


def _first_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = next((line for line in lines[1:] if _ERROR_LINE.search(line)), lines[0] if lines else "no output")
    return found[:200]


def build() -> tuple[ModuleType, float]:
    """Compile (unless already compiled) and load the extension; (module, seconds spent building).

    Each build runs in a directory of its own and the finished library is moved into place in one
    rename, so processes building at once (the ranks of a run, jobs of a sweep) never load a half-written
    file, and a build killed midway leaves no lock behind. A library that is there but does not load
    (truncated, built by another toolchain) is built again."""
    try:
        module = load_built()
    except (ImportError, OSError):
        module = None
    if module is not None:
        return module, 0.0
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    target = library_path()
    started = time.perf_counter()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    except OSError as exc:
        raise KernelBuildError(
            f"cannot write the fused CPU kernels' cache {target.parent} ({exc}); set REWARDCTL_KERNELS_DIR to a "
            "writable folder, or hardware.cpu_fused_kernels=false"
        ) from exc
    try:
        module = load(
            name=extension_name(),
            sources=[str(SOURCE)],
            extra_cflags=compile_flags(),
            build_directory=str(work),
            with_cuda=False,
            verbose=False,
        )
        os.replace(work / target.name, target)
    except (RuntimeError, OSError, ImportError) as exc:
        log = target.parent / "build-error.log"
        log.write_text(str(exc))
        raise KernelBuildError(
            f"building the fused CPU kernels failed ({_first_error(str(exc))}); full output in {log}. They need "
            "a C++ compiler and ninja (pip install ninja); set hardware.cpu_fused_kernels=false to run without them"
        ) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return module, time.perf_counter() - started

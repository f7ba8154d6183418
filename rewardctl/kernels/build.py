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
import shutil
import sys
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
    for part in (torch.__version__, torch.version.git_version, f"{sys.version_info[0]}.{sys.version_info[1]}"):
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


def build() -> tuple[ModuleType, float]:
    """Compile (or find already compiled) and load the extension; (module, seconds spent building)."""
    module = load_built()
    if module is not None:
        return module, 0.0
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        load(
            name=extension_name(),
            sources=[str(SOURCE)],
            extra_cflags=compile_flags(),
            build_directory=str(directory),
            with_cuda=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as exc:
        log = directory / "build-error.log"
        log.write_text(str(exc))
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise KernelBuildError(
            f"building the fused CPU kernels failed ({first[:160]}); full output in {log}. They need a C++ "
            "compiler and ninja (pip install ninja); set hardware.cpu_fused_kernels=false to run without them"
        ) from exc
    seconds = time.perf_counter() - started
    module = load_built()
    if module is None:
        raise KernelBuildError(f"the fused CPU kernels were built but {library_path()} is missing")
    return module, seconds

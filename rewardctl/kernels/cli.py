"""``rewardctl kernels build|status``: compile the fused CPU kernels once, or say whether they are built."""

from __future__ import annotations

import sys

USAGE = """usage: rewardctl kernels build|status

  build   compile rewardctl's fused CPU kernels for this torch, Python and CPU (once; about 30 s on
          2 cores; needs a C++ compiler and ninja) into $REWARDCTL_KERNELS_DIR or ~/.cache/rewardctl/kernels
  status  say whether they are built here, and where

Runs use them when built (hardware.cpu_fused_kernels=auto); hardware.cpu_fused_kernels=true builds them
at the start of a run instead; false never uses them."""


def main(args: list[str]) -> int:
    from rewardctl.kernels import build

    if len(args) != 1 or args[0] not in ("build", "status"):
        print(USAGE, file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    where = build.library_path()
    if args[0] == "status":
        try:
            loaded = build.load_built() is not None
            state = "built" if loaded else "not built"
        except (ImportError, OSError) as exc:
            loaded, state = False, f"built but does not load ({exc}; `rewardctl kernels build` rebuilds it)"
        print(f"fused CPU kernels ({build.capability()}): {state}: {where}")
        return 0 if loaded else 1
    try:
        _, seconds = build.build()
    except build.KernelBuildError as exc:
        print(f"rewardctl: error: {exc}", file=sys.stderr)
        return 2
    done = f"built in {seconds:.0f} s" if seconds else "already built"
    print(f"fused CPU kernels ({build.capability()}): {done}: {where}")
    return 0

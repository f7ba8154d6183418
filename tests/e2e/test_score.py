"""`rewardctl score`: a trained model's scores for new rows equal `rewardctl eval`'s for the same rows,
in every row shape; normalisation by the statistics saved with the model; stdin/stdout; bad rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from rewardctl.errors import ConfigError, DataError
from rewardctl.evaluate import evaluate_run
from rewardctl.export import export_run
from rewardctl.score import score_rows
from rewardctl.training.scorer import has_reward_stats

from ..conftest import SAMPLES, cli, compose_eval, compose_export, compose_score, read_jsonl, run_training, write_jsonl


@pytest.fixture(scope="module")
def pairwise_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run_dir = run_training(tmp_path_factory.mktemp("score"), ["train.max_steps=3", "data.max_eval_rows=48"])
    return run_dir


@pytest.fixture(scope="module")
def eval_predictions(pairwise_run: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("eval")
    evaluate_run(compose_eval([f"run_dir={pairwise_run}", f"output_dir={out}"]))
    return read_jsonl(out / "predictions.jsonl")


def eval_rows(predictions: list[dict]) -> list[dict]:
    rows = read_jsonl(SAMPLES / "pairwise" / "eval.jsonl")
    return [rows[p["row"] - 1] for p in predictions]


def test_pairs_score_as_eval_and_the_saved_statistics_are_the_eval_sets(
    pairwise_run: Path, eval_predictions: list[dict], tmp_path: Path
):
    rows = eval_rows(eval_predictions)
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = score_rows(compose_score([f"run_dir={pairwise_run}", f"dataset={source}"]))
    out = pairwise_run / "scores" / "pairs.jsonl"
    assert result == {"rows": 48, "scored": 48, "seconds": result["seconds"], "output": str(out)}
    scored = read_jsonl(out)
    for row, got, want in zip(rows, scored, eval_predictions, strict=True):
        assert {k: got[k] for k in row} == row  # every input column kept as it was
        assert got["chosen_reward"] == pytest.approx(want["chosen_reward"], abs=1e-5)
        assert got["rejected_reward"] == pytest.approx(want["rejected_reward"], abs=1e-5)
    rewards = torch.tensor([r[k] for r in scored for k in ("chosen_reward", "rejected_reward")], dtype=torch.float64)
    saved = json.loads((pairwise_run / "model" / "config.json").read_text())["rewardctl"]
    assert saved["reward_mean"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    assert saved["reward_std"] == pytest.approx(rewards.std(unbiased=False).item(), abs=1e-6)


def test_single_responses_and_lists_score_like_the_pairs_and_normalize(
    pairwise_run: Path, eval_predictions: list[dict], tmp_path: Path
):
    rows = eval_rows(eval_predictions)[:6]
    singles = [{"prompt": r["prompt"], "response": r["chosen"], "id": i} for i, r in enumerate(rows)]
    lists = [{"prompt": r["prompt"], "responses": [r["rejected"], r["chosen"]]} for r in rows]
    out = tmp_path / "single.parquet"
    score_rows(
        compose_score(
            [f"run_dir={pairwise_run}", f"dataset={write_jsonl(tmp_path / 's.jsonl', singles)}", f"output={out}"]
        )
    )
    single = Dataset.from_parquet(str(out)).to_list()
    assert [r["id"] for r in single] == list(range(6))
    assert [r["reward"] for r in single] == pytest.approx([p["chosen_reward"] for p in eval_predictions[:6]], abs=1e-5)

    score_rows(
        compose_score(
            [
                f"run_dir={pairwise_run}",
                f"dataset={write_jsonl(tmp_path / 'l.jsonl', lists)}",
                f"output={tmp_path / 'l-out.jsonl'}",
                "normalize=true",
            ]
        )
    )
    saved = json.loads((pairwise_run / "model" / "config.json").read_text())["rewardctl"]
    for record, want in zip(read_jsonl(tmp_path / "l-out.jsonl"), eval_predictions, strict=False):
        expected = [
            (want[k] - saved["reward_mean"]) / saved["reward_std"] for k in ("rejected_reward", "chosen_reward")
        ]
        assert record["rewards"] == pytest.approx(expected, abs=1e-4)


def test_a_model_directory_alone_scores_as_its_run(pairwise_run: Path, eval_predictions: list[dict], tmp_path: Path):
    """A copy of model/ outside any run: the method and budget come from its own config files."""
    alone = tmp_path / "rm"
    shutil.copytree(pairwise_run / "model", alone)
    source = write_jsonl(tmp_path / "pairs.jsonl", eval_rows(eval_predictions)[:8])
    score_rows(compose_score([f"model_dir={alone}", f"dataset={source}", f"output={tmp_path / 'o.jsonl'}"]))
    got = read_jsonl(tmp_path / "o.jsonl")
    assert [r["chosen_reward"] for r in got] == pytest.approx(
        [p["chosen_reward"] for p in eval_predictions[:8]], abs=1e-5
    )


def test_an_export_scores_as_its_run_wherever_it_is_moved(
    pairwise_run: Path, eval_predictions: list[dict], tmp_path: Path
):
    """An export carries the run's config (rewardctl_run.yaml) and its reward statistics."""
    export_run(compose_export([f"run_dir={pairwise_run}", f"output_dir={tmp_path / 'exported'}"]))
    moved = shutil.move(str(tmp_path / "exported"), str(tmp_path / "elsewhere"))
    saved = json.loads((Path(moved) / "config.json").read_text())["rewardctl"]
    assert (
        saved["reward_std"]
        == json.loads((pairwise_run / "model" / "config.json").read_text())["rewardctl"]["reward_std"]
    )
    source = write_jsonl(tmp_path / "pairs.jsonl", eval_rows(eval_predictions)[:8])
    score_rows(compose_score([f"model_dir={moved}", f"dataset={source}", f"output={tmp_path / 'o.jsonl'}"]))
    got = read_jsonl(tmp_path / "o.jsonl")
    assert [r["rejected_reward"] for r in got] == pytest.approx(
        [p["rejected_reward"] for p in eval_predictions[:8]], abs=1e-5
    )


def test_bad_rows_are_named_or_kept_with_null_scores(pairwise_run: Path, tmp_path: Path):
    rows = [{"prompt": "Q", "response": " fine"}, {"prompt": "Q", "response": 7}, {"prompt": "Q", "response": " ok"}]
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2, field 'response'"):
        score_rows(compose_score([f"run_dir={pairwise_run}", f"dataset={source}"]))
    out = tmp_path / "kept.jsonl"
    score_rows(compose_score([f"run_dir={pairwise_run}", f"dataset={source}", "bad_rows=skip", f"output={out}"]))
    got = read_jsonl(out)
    assert [r["response"] for r in got] == [" fine", 7, " ok"]
    assert got[1]["reward"] is None and isinstance(got[0]["reward"], float) and isinstance(got[2]["reward"], float)
    table = tmp_path / "kept.parquet"  # one type per parquet column: the mixed column as JSON text
    score_rows(compose_score([f"run_dir={pairwise_run}", f"dataset={source}", "bad_rows=skip", f"output={table}"]))
    kept = Dataset.from_parquet(str(table)).to_list()
    assert [r["response"] for r in kept] == ['" fine"', "7", '" ok"']
    assert [r["reward"] for r in kept] == pytest.approx([got[0]["reward"], None, got[2]["reward"]], abs=1e-6)
    with pytest.raises(DataError, match="missing column 'responses'"):
        score_rows(
            compose_score([f"run_dir={pairwise_run}", f"dataset={write_jsonl(tmp_path / 'x.jsonl', [{'text': 'a'}])}"])
        )
    with pytest.raises(ConfigError, match="one of run_dir"):
        score_rows(compose_score([f"dataset={source}"]))


def test_stdin_to_stdout_through_the_command(pairwise_run: Path, eval_predictions: list[dict]):
    rows = eval_rows(eval_predictions)[:3]
    text = "".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n" for r in rows)
    done = cli("score", f"run_dir={pairwise_run}", "data=-", "output=-", stdin=text)
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]  # stdout holds the scores only
    assert [r["reward"] for r in got] == pytest.approx([p["chosen_reward"] for p in eval_predictions[:3]], abs=1e-5)
    assert "scored 3 of 3 rows" in done.stderr
    bad = cli("score", f"run_dir={pairwise_run}", "data=-", "output=-", stdin='{"response": "a"}\nnot json\n')
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "rewardctl: error: <stdin>, row 2: is not valid JSON"
    )


@pytest.mark.parametrize("method", ["prm", "bco"])
def test_prm_and_bco_rows_score_as_eval(method: str, tmp_path: Path):
    _, run_dir = run_training(tmp_path, [f"method={method}", "train.max_steps=2", "data.max_eval_rows=12"])
    evaluate_run(compose_eval([f"run_dir={run_dir}", f"output_dir={tmp_path / 'eval'}"]))
    predictions = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    raw = read_jsonl(SAMPLES / method / "eval.jsonl")
    rows = [raw[p["row"] - 1] for p in predictions]
    unlabelled = [{k: v for k, v in r.items() if k not in ("labels", "label")} for r in rows]
    source = write_jsonl(tmp_path / "rows.jsonl", unlabelled)
    score_rows(compose_score([f"run_dir={run_dir}", f"dataset={source}", f"output={tmp_path / 'o.jsonl'}"]))
    got = read_jsonl(tmp_path / "o.jsonl")
    if method == "prm":
        for record, want in zip(got, predictions, strict=True):
            assert record["step_probs"] == pytest.approx(want["step_probs"], abs=1e-5)
            assert record["predicted_first_error"] == want["predicted_first_error"]
    else:
        delta = json.loads((run_dir / "model" / "config.json").read_text())["rewardctl"]["delta"]
        for record, want in zip(got, predictions, strict=True):
            assert record["reward"] == pytest.approx(want["reward"] - delta, abs=1e-5)
            assert record["probability"] == pytest.approx(
                1 / (1 + torch.exp(torch.tensor(delta - want["reward"])).item()), abs=1e-6
            )


def test_a_run_without_an_eval_set_saves_statistics_of_its_train_rows(tmp_path: Path):
    """With data.max_train_rows under the sample size, the sample is every train row: the saved mean
    and std are exactly those of the train rows' scores."""
    overrides = ["train.max_steps=1", "data.eval=null", "data.max_train_rows=40", "train.per_device_batch_size=8"]
    _, run_dir = run_training(tmp_path, overrides)
    saved = json.loads((run_dir / "model" / "config.json").read_text())["rewardctl"]
    rows = read_jsonl(SAMPLES / "pairwise" / "train.jsonl")[:40]
    score_rows(compose_score([f"run_dir={run_dir}", f"dataset={write_jsonl(tmp_path / 't.jsonl', rows)}"]))
    scored = read_jsonl(run_dir / "scores" / "t.jsonl")
    rewards = torch.tensor([r[k] for r in scored for k in ("chosen_reward", "rejected_reward")], dtype=torch.float64)
    assert saved["reward_mean"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    assert saved["reward_std"] == pytest.approx(rewards.std(unbiased=False).item(), abs=1e-6)


def test_a_checkpoint_carries_reward_statistics_only_of_its_own_weights(tmp_path: Path):
    """eval at step 0 and 4, checkpoints at 2 and 4: step-2's weights were never evaluated, so it holds
    no statistics (normalize refuses) rather than the untrained model's; step-4's are the final eval's."""
    overrides = ["train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=0", "data.max_eval_rows=16"]
    _, run_dir = run_training(tmp_path, overrides)
    assert not has_reward_stats(run_dir / "checkpoints" / "step-2")
    assert has_reward_stats(run_dir / "checkpoints" / "step-4") and has_reward_stats(run_dir / "model")
    source = write_jsonl(tmp_path / "r.jsonl", [{"response": "hello"}])
    with pytest.raises(ConfigError, match="no reward statistics"):
        score_rows(compose_score([f"run_dir={run_dir}", "checkpoint=step-2", f"dataset={source}", "normalize=true"]))


def test_a_lora_adapter_copied_out_of_its_run_scores_as_its_run(tmp_path: Path):
    """A run's model/ carries the run's config (rewardctl_run.yaml), so an adapter directory moved
    anywhere scores with the run's method, tokenisation and base model, as ``rewardctl eval`` does."""
    overrides = ["peft=lora", "peft.r=4", "experiment=smoke", "train.max_steps=3", "data.max_eval_rows=12"]
    _, run_dir = run_training(tmp_path, overrides)
    assert (run_dir / "model" / "rewardctl_run.yaml").is_file()
    assert (run_dir / "model-merged" / "rewardctl_run.yaml").is_file()
    evaluate_run(compose_eval([f"run_dir={run_dir}", f"output_dir={tmp_path / 'eval'}"]))
    predictions = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    adapter = Path(shutil.copytree(run_dir / "model", tmp_path / "elsewhere" / "adapter"))
    assert (adapter / "adapter_config.json").is_file()
    shutil.rmtree(run_dir)  # nothing of the run is left to read
    source = write_jsonl(tmp_path / "pairs.jsonl", eval_rows(predictions))
    score_rows(compose_score([f"model_dir={adapter}", f"dataset={source}", f"output={tmp_path / 'o.jsonl'}"]))
    got = read_jsonl(tmp_path / "o.jsonl")
    for record, want in zip(got, predictions, strict=True):
        assert record["chosen_reward"] == pytest.approx(want["chosen_reward"], abs=1e-5)
        assert record["rejected_reward"] == pytest.approx(want["rejected_reward"], abs=1e-5)


def test_regression_scores_each_response_of_a_pair_or_list_alone(tmp_path: Path):
    """A regression model is trained on single responses: a pair's or a list's rewards are each
    response's own score, equal to scoring it as a single row with the same prompt."""
    _, run_dir = run_training(tmp_path, ["method=regression", "experiment=smoke", "train.max_steps=2"])
    rows = read_jsonl(SAMPLES / "regression" / "eval.jsonl")[:6]
    prompt = rows[0]["prompt"]
    singles = [{"prompt": prompt, "response": r["response"]} for r in rows]
    pairs = [
        {"prompt": prompt, "chosen": a["response"], "rejected": b["response"]}
        for a, b in zip(rows[:-1], rows[1:], strict=True)
    ]
    lists = [{"prompt": prompt, "responses": [r["response"] for r in rows[:4]]}]

    def scored(name: str, data: list[dict]) -> list[dict]:
        out = tmp_path / f"{name}-out.jsonl"
        source = write_jsonl(tmp_path / f"{name}.jsonl", data)
        score_rows(compose_score([f"run_dir={run_dir}", f"dataset={source}", f"output={out}"]))
        return read_jsonl(out)

    def flat(values: list[dict[str, float]]) -> list[float]:
        return [
            score for per_attribute in values for score in (per_attribute["helpfulness"], per_attribute["verbosity"])
        ]

    single = [r["reward"] for r in scored("singles", singles)]  # one score per attribute
    assert all(set(v) == {"helpfulness", "verbosity"} for v in single)
    assert len({round(v["helpfulness"], 6) for v in single}) > 1  # the responses really score differently
    pair = scored("pairs", pairs)
    assert flat([r["chosen_reward"] for r in pair]) == pytest.approx(flat(single[:5]), abs=1e-5)
    assert flat([r["rejected_reward"] for r in pair]) == pytest.approx(flat(single[1:6]), abs=1e-5)
    assert flat(scored("lists", lists)[0]["rewards"]) == pytest.approx(flat(single[:4]), abs=1e-5)

"""Ranklist method: vectorised listwise losses and metrics by hand, exact collated tensors for a ragged
batch, the three input forms agreeing, row errors by name (the training runs are in
tests/e2e/test_ranklist_runs.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rewardctl.data.loading import load_rows
from rewardctl.data.prepare import ROW_COLUMN
from rewardctl.errors import ConfigError, DataError
from rewardctl.methods.pairwise import bradley_terry_loss
from rewardctl.methods.ranking import list_metrics, listmle_loss, pair_count, ranked_pair_loss
from rewardctl.methods.ranklist import RanklistMethod
from rewardctl.methods.registry import to_run_config

from ..conftest import (
    compose_train,
    write_jsonl,
)


def make_method(*overrides: str) -> RanklistMethod:
    run = to_run_config(compose_train(["method=ranklist", *overrides]))
    return RanklistMethod(run.method, run)


def nll_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


# A ragged batch: K = 2, 3 and 5 (rank -1 is padding).
REWARDS = torch.tensor(
    [
        [0.5, -0.5, 0.0, 0.0, 0.0],
        [1.0, 2.0, -1.0, 0.0, 0.0],
        [3.0, 1.0, 2.0, 0.0, -2.0],
    ]
)
RANKS = torch.tensor(
    [
        [0, 1, -1, -1, -1],
        [0, 1, 2, -1, -1],
        [0, 1, 2, 3, 4],
    ]
)


def by_hand_pairs(rewards: list[float]) -> list[float]:
    """-log sigma(r_i - r_j) for every i < j of a list given best first: the article's triple loop."""
    return [nll_sigmoid(rewards[i] - rewards[j]) for i in range(len(rewards)) for j in range(i + 1, len(rewards))]


# ---- losses ---------------------------------------------------------------------------------------
def test_pairwise_rank_loss_on_a_ragged_batch_by_hand():
    losses, pairs = ranked_pair_loss(REWARDS, RANKS)
    lists = [[0.5, -0.5], [1.0, 2.0, -1.0], [3.0, 1.0, 2.0, 0.0, -2.0]]
    expected = [sum(by_hand_pairs(r)) for r in lists]
    assert pairs.tolist() == [1, 3, 10]
    torch.testing.assert_close(losses, torch.tensor(expected))
    # The K = 2 list by hand: -log sigma(1) = log(1 + e^-1).
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # The batch loss is the mean over all 14 valid pairs, not a mean of per-list means.
    all_pairs = [loss for r in lists for loss in by_hand_pairs(r)]
    assert (losses.sum() / pairs.sum()).item() == pytest.approx(sum(all_pairs) / 14, abs=1e-6)


def test_pairwise_rank_loss_with_score_margins_by_hand():
    rewards = torch.tensor([[2.0, 1.0, 0.5]])
    ranks = torch.tensor([[0, 1, 2]])
    scores = torch.tensor([[5.0, 3.0, 2.5]])
    losses, pairs = ranked_pair_loss(rewards, ranks, scores, margin_scale=0.5)
    expected = nll_sigmoid(1.0 - 0.5 * 2.0) + nll_sigmoid(1.5 - 0.5 * 2.5) + nll_sigmoid(0.5 - 0.5 * 0.5)
    assert pairs.item() == 3 and losses.item() == pytest.approx(expected, abs=1e-6)


def test_k2_lists_give_exactly_the_pairwise_loss():
    chosen, rejected = torch.randn(7, generator=torch.Generator().manual_seed(0)), torch.randn(7)
    losses, pairs = ranked_pair_loss(torch.stack([chosen, rejected], dim=1), torch.tensor([[0, 1]] * 7))
    assert torch.equal(pairs, torch.ones(7, dtype=torch.long))
    torch.testing.assert_close(losses, bradley_terry_loss(chosen, rejected), rtol=0, atol=0)
    assert (losses.sum() / pairs.sum()).item() == pytest.approx(bradley_terry_loss(chosen, rejected).mean().item())


def test_listmle_on_a_ragged_batch_by_hand():
    got = listmle_loss(REWARDS, RANKS)

    def plackett_luce_nll(r: list[float]) -> float:
        return sum(math.log(sum(math.exp(x) for x in r[i:])) - r[i] for i in range(len(r)))

    expected = [
        plackett_luce_nll([0.5, -0.5]),
        plackett_luce_nll([1.0, 2.0, -1.0]),
        plackett_luce_nll([3.0, 1.0, 2.0, 0.0, -2.0]),
    ]
    torch.testing.assert_close(got, torch.tensor(expected))
    assert got[0].item() == pytest.approx(math.log(math.exp(0.5) + math.exp(-0.5)) - 0.5, abs=1e-6)


def test_ties_make_no_pair_and_share_the_listmle_risk_set():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    ranks = torch.tensor([[0, 1, 1]])  # the last two are tied
    losses, pairs = ranked_pair_loss(rewards, ranks)
    assert pairs.item() == 2 and losses.item() == pytest.approx(nll_sigmoid(1.0) + nll_sigmoid(-1.0), abs=1e-6)
    lse_all = math.log(math.exp(1) + 1 + math.exp(2))
    lse_tied = math.log(1 + math.exp(2))
    expected = (lse_all - 1) + (lse_tied - 0) + (lse_tied - 2)
    assert listmle_loss(rewards, ranks).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("loss", [ranked_pair_loss, listmle_loss])
def test_gradients_reach_every_response_and_never_padding(loss):
    rewards = REWARDS.clone().requires_grad_(True)
    out = loss(rewards, RANKS)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    grad = rewards.grad
    assert torch.isfinite(grad).all()
    assert (grad[RANKS != -1] != 0).all(), grad
    assert (grad[RANKS == -1] == 0).all()


def test_list_metrics_by_hand():
    rewards = torch.tensor([[3.0, 1.0, 2.0, 0.0], [2.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    ranks = torch.tensor([[0, 1, 2, -1], [0, 1, 2, 3], [0, 1, -1, -1]])
    m = list_metrics(rewards, ranks)
    assert m["pairs"].tolist() == [3, 6, 1]
    assert m["correct_pairs"].tolist() == [2, 5, 0]  # list 2: (0,0) tie at the bottom; list 3: a tie is wrong
    assert m["top1"].tolist() == [True, True, False]
    assert m["exact"].tolist() == [False, False, False]
    # tau-b: list 1 (2 - 1) / 3; list 2 (5 - 0) / sqrt(6 * 5) with one predicted tie; list 3 all tied -> 0.
    torch.testing.assert_close(m["kendall_tau"], torch.tensor([1 / 3, 5 / math.sqrt(30), 0.0]))
    perfect = list_metrics(torch.tensor([[5.0, 4.0, 3.0]]), torch.tensor([[0, 1, 2]]))
    assert perfect["exact"].item() and perfect["kendall_tau"].item() == pytest.approx(1.0)


def test_tau_b_and_top1_with_tied_gold_ranks_by_hand():
    ranks = torch.tensor([[0, 0, 1], [0, 0, 1]])
    m = list_metrics(torch.tensor([[3.0, 1.0, 0.0], [3.0, 0.0, 1.0]]), ranks)
    # list 1: pairs (0,2), (1,2) concordant, (0,1) a gold tie -> 2 / sqrt((3 - 1) * 3); list 2: +1 - 1 = 0.
    torch.testing.assert_close(m["kendall_tau"], torch.tensor([2 / math.sqrt(6), 0.0]))
    assert m["top1"].tolist() == [True, False]  # every best-ranked response must beat every other one
    assert m["pairs"].tolist() == [2, 2] and m["exact"].tolist() == [True, False]


def test_pair_count_for_lists_with_ties():
    assert pair_count(torch.tensor([[0, 0, 1, 2], [0, 1, -1, -1]])).tolist() == [5, 1]


# ---- data -----------------------------------------------------------------------------------------
LISTS = [
    {"prompt": "Q1:", "responses": [" best", " good", " bad"]},
    {"prompt": "Q2:", "responses": [" yes", " no"]},
    {"prompt": "Q3:", "responses": [" a", " b", " c", " d", " e"]},
]


def prepared(method: RanklistMethod, path: Path, *overrides: str) -> list[dict]:
    rows = load_rows(str(path), split="train", layout=method.run.data.layout)
    return list(method.prepare(rows, str(path), training=True).dataset)


def test_tsv_and_scores_forms_parse_to_the_jsonl_rows(tmp_path: Path):
    plain = [{"responses": [t.strip() for t in r["responses"]]} for r in LISTS]  # TSV fields are stripped
    method = make_method()
    from_jsonl = prepared(method, write_jsonl(tmp_path / "lists.jsonl", plain))
    tsv = tmp_path / "lists.tsv"
    tsv.write_text("".join("\t".join(r["responses"]) + "\n" for r in plain) + "\n", encoding="utf-8")
    from_tsv = prepared(make_method("data.layout=ranked_tsv"), tsv)
    shuffled = [
        {"responses": ["bad", "best", "good"], "scores": [1, 9.5, 4]},
        {"responses": ["no", "yes"], "scores": [-1.0, 2.0]},
        {"responses": ["c", "e", "a", "d", "b"], "scores": [3, 1, 5, 2, 4]},
    ]
    from_scores = prepared(method, write_jsonl(tmp_path / "scored.jsonl", shuffled))
    for a, b, c in zip(from_jsonl, from_tsv, from_scores, strict=True):
        assert a["responses_ids"] == b["responses_ids"] == c["responses_ids"]
        assert a["ranks"] == b["ranks"] == c["ranks"]
    assert [r["ranks"] for r in from_jsonl] == [[0, 1, 2], [0, 1], [0, 1, 2, 3, 4]]
    assert from_scores[0]["order"] == [1, 2, 0] and from_jsonl[0]["order"] == [0, 1, 2]
    # Each response is one text plus EOS, exactly as the pairwise method encodes a response.
    eos = method.tokenizer.eos_token_id
    assert from_jsonl[1]["responses_ids"][0] == method.tokenizer("yes")["input_ids"] + [eos]


def test_tsv_fields_lose_csv_quotes_and_a_folder_holds_one_file_per_split(tmp_path: Path):
    (tmp_path / "train.tsv").write_text('"say ""hi"""\tplain\n\n  x \t y\r\n"a\ttab"\tz\rw\n', encoding="utf-8")
    (tmp_path / "dev.tsv").write_text("a\tb\tc\n", encoding="utf-8")
    from rewardctl.config.schema import Layout

    train = load_rows(str(tmp_path), split="train", layout=Layout.ranked_tsv)
    assert train["responses"] == [['say "hi"', "plain"], ["x", "y"], ["a\ttab", "z\rw"]]
    assert load_rows(str(tmp_path), split="dev", layout=Layout.ranked_tsv)["responses"] == [["a", "b", "c"]]
    with pytest.raises(DataError, match="no test.tsv or test.txt"):
        load_rows(str(tmp_path), split="test", layout=Layout.ranked_tsv)


def test_scores_with_ties_give_shared_ranks_and_margins_follow_the_sorted_order(tmp_path: Path):
    rows = [{"prompt": "Q:", "responses": [" a", " b", " c", " d"], "scores": [1, 3, 3, 0]}]
    method = make_method("method.score_margin=true")
    (row,) = prepared(method, write_jsonl(tmp_path / "tied.jsonl", rows))
    assert row["order"] == [1, 2, 0, 3] and row["ranks"] == [0, 0, 1, 2] and row["scores"] == [3.0, 3.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("row", "field", "text"),
    [
        ({"prompt": "Q", "responses": [" only"]}, "responses", "holds 1 response(s); a ranked list needs at least 2"),
        ({"prompt": "Q", "responses": []}, "responses", "holds 0 response(s)"),
        ({"prompt": "Q", "responses": [" a", "  "]}, "responses[1]", "is empty"),
        ({"prompt": "Q", "responses": [" a", " b"], "scores": [1.0]}, "scores", "holds 1 scores for 2 responses"),
        ({"prompt": "Q", "responses": [" a", " b"], "scores": [1.0, "x"]}, "scores[1]", "must be a finite number"),
        ({"prompt": "Q", "responses": [" a", " b"], "scores": [2, 2]}, "scores", "are all equal"),
        ({"prompt": "Q", "responses": [" a", " b", " a"]}, "responses", "responses 0 and 2 are identical"),
    ],
)
def test_bad_lists_are_refused_naming_file_row_and_field(tmp_path: Path, row, field, text):
    good = {"prompt": "Q", "responses": [" a", " b"], "scores": [1.0, 0.0]} if "scores" in row else LISTS[0]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(DataError) as info:
        prepared(make_method(), path)
    message = str(info.value)
    assert str(path) in message and "row 3" in message and f"'{field}'" in message and text in message


def test_bad_lists_are_skipped_and_counted_on_request(tmp_path: Path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [LISTS[0], {"prompt": "Q", "responses": [" x"]}, LISTS[1]])
    method = make_method("data.bad_rows=skip")
    rows = load_rows(str(path), split="train")
    split = method.prepare(rows, str(path), training=True)
    assert split.report["skipped_bad"] == 1 and split.report["used"] == 2
    assert split.report["list_sizes"] == {2: 1, 3: 1} and split.report["responses"] == 5
    assert list(split.dataset[ROW_COLUMN]) == [0, 2]


def test_score_margin_needs_a_scores_column_and_pairwise_loss(tmp_path: Path):
    with pytest.raises(DataError, match="needs a 'scores' column"):
        prepared(make_method("method.score_margin=true"), write_jsonl(tmp_path / "plain.jsonl", LISTS))
    with pytest.raises(ConfigError, match="method.score_margin"):
        make_method("method.score_margin=true", "method.loss=listmle")


def test_collator_flattens_a_ragged_batch_with_exact_tensors():
    method = make_method("data.share_prefix=false")
    pad = method.tokenizer.pad_token_id
    features = [
        {"responses_ids": [[5, 6], [7]], "ranks": [0, 1], "order": [0, 1], ROW_COLUMN: 4},
        {"responses_ids": [[8, 9, 10], [11], [12, 13]], "ranks": [0, 1, 1], "order": [2, 0, 1], ROW_COLUMN: 0},
    ]
    batch = method.collate(features)
    assert torch.equal(
        batch["input_ids"], torch.tensor([[5, 6, pad], [7, pad, pad], [8, 9, 10], [11, pad, pad], [12, 13, pad]])
    )
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]))
    assert torch.equal(batch["ranks"], torch.tensor([[0, 1, -1], [0, 1, 1]]))
    assert torch.equal(batch["order"], torch.tensor([[0, 1, -1], [2, 0, 1]]))
    assert torch.equal(batch["row"], torch.tensor([4, 0]))
    assert method.batch_weight(batch).item() == 3  # one pair + two (the tie makes none)
    assert make_method("method.loss=listmle").batch_weight(batch).item() == 2


def test_collator_packs_each_list_behind_its_shared_prefix():
    method = make_method()
    pad = method.tokenizer.pad_token_id
    batch = method.collate(
        [
            {"responses_ids": [[5, 6, 1], [5, 6, 2, 3]], "ranks": [0, 1], "order": [0, 1], ROW_COLUMN: 4},
            {"responses_ids": [[8, 9], [8, 4], [7]], "ranks": [0, 1, 1], "order": [2, 0, 1], ROW_COLUMN: 0},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 1, 2, 3], [8, 9, 8, 4, 7]]  # row 1 shares nothing
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3], [0, 1, 0, 1, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 1, 2, 2], [1, 1, 2, 2, 3]]
    assert batch["reward_index"].tolist() == [2, 4, 6, 8, 9]  # list by list, best first
    assert method.batch_weight(batch).item() == 3 and method.token_count(batch).item() == 10
    assert pad not in batch["input_ids"].tolist()[0]


def test_one_forward_over_all_responses_puts_rewards_back_in_their_lists():
    method = make_method("data.share_prefix=false")
    calls = []

    def model(input_ids, attention_mask):
        calls.append(input_ids.shape)
        return input_ids[:, 0].float()  # reward = first token id

    batch = method.collate(
        [
            {"responses_ids": [[5, 6], [7]], "ranks": [0, 1], "order": [0, 1]},
            {"responses_ids": [[8], [11], [2, 1]], "ranks": [0, 1, 2], "order": [0, 1, 2]},
        ]
    )
    out = method.eval_step(model, batch)
    assert calls == [(5, 2)]
    assert torch.equal(out["rewards"], torch.tensor([[5.0, 7.0, 0.0], [8.0, 11.0, 2.0]]))
    metrics = method.eval_metrics(out)
    assert metrics["accuracy"] == pytest.approx(2 / 4)  # (5>7) no; (8>11) no, (8>2) yes, (11>2) yes
    assert metrics["top1_accuracy"] == 0.0 and metrics["lists"] == 2 and metrics["pairs"] == 4


def test_ranked_tsv_layout_applies_per_file_so_a_jsonl_eval_set_is_read_by_its_suffix(tmp_path: Path):
    from rewardctl.config.schema import Layout

    (tmp_path / "train.tsv").write_text("best\tworse\tworst\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text('{"responses": ["good", "bad"]}\n', encoding="utf-8")
    table = tmp_path / "table"
    table.mkdir()
    (table / "test.jsonl").write_text('{"responses": ["x", "y", "z"]}\n', encoding="utf-8")

    assert load_rows(str(tmp_path / "train.tsv"), split="train", layout=Layout.ranked_tsv)["responses"] == [
        ["best", "worse", "worst"]
    ]
    assert load_rows(str(tmp_path / "eval.jsonl"), split="test", layout=Layout.ranked_tsv)["responses"] == [
        ["good", "bad"]
    ]
    # A folder whose split is a JSON-lines table is read as a table; one with <split>.tsv as lists.
    assert load_rows(str(table), split="test", layout=Layout.ranked_tsv)["responses"] == [["x", "y", "z"]]
    with pytest.raises(DataError, match="no train.tsv or train.txt"):
        load_rows(str(table), split="train", layout=Layout.ranked_tsv)

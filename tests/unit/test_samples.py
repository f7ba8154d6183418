"""The bundled sample data and tiny model asset are what their generators produce."""

from __future__ import annotations

import json

from transformers import AutoConfig, AutoTokenizer

from rewardctl.samples import generate

from ..conftest import SAMPLES, TINY


def test_shipped_samples_match_the_generator():
    assert generate.main(["--check"]) == 0


def test_pairwise_sample_is_balanced_over_failure_modes_and_formats_agree():
    modes = [e["mode"] for e in generate.preference_examples("train")]
    assert {m: modes.count(m) for m in generate.MODES} == {m: 800 for m in generate.MODES}
    standard = [json.loads(line) for line in (SAMPLES / "pairwise" / "eval.jsonl").read_text().splitlines()]
    chat = [json.loads(line) for line in (SAMPLES / "pairwise_chat" / "eval.jsonl").read_text().splitlines()]
    assert len(standard) == len(chat) == 500
    for s, c in zip(standard, chat, strict=True):
        assert (
            s["chosen"].strip() == c["chosen"][0]["content"]
            and s["prompt"] == f"User: {c['prompt'][0]['content']}\nAssistant:"
        )
    train_questions = {
        json.loads(line)["prompt"] for line in (SAMPLES / "pairwise" / "train.jsonl").read_text().splitlines()
    }
    assert not train_questions & {s["prompt"] for s in standard}  # eval prompts are held-out phrasings


def test_tiny_asset_is_consistent():
    tokenizer = AutoTokenizer.from_pretrained(str(TINY))
    config = AutoConfig.from_pretrained(str(TINY))
    assert config.vocab_size == len(tokenizer) == 1024
    assert config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id == config.eos_token_id
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.decode(tokenizer("héllo wörld 你好")["input_ids"]) == "héllo wörld 你好"  # byte-level: any text


def test_ranklist_sample_spreads_list_sizes_and_keeps_the_ladder_order():
    examples = list(generate.ranked_examples("train"))
    sizes = [len(e["responses"]) for e in examples]
    assert {k: sizes.count(k) for k in (2, 3, 4, 5)} == {2: 625, 3: 625, 4: 625, 5: 625}
    for e in examples:
        rungs = [generate.LADDER.index(r) for r in e["rungs"]]
        assert rungs == sorted(set(rungs)) and len(set(e["responses"])) == len(e["responses"])
    standard = [json.loads(line) for line in (SAMPLES / "ranklist" / "eval.jsonl").read_text().splitlines()]
    chat = [json.loads(line) for line in (SAMPLES / "ranklist_chat" / "eval.jsonl").read_text().splitlines()]
    assert len(standard) == len(chat) == 400
    for s, c in zip(standard, chat, strict=True):
        assert [r.strip() for r in s["responses"]] == [m[0]["content"] for m in c["responses"]]
    train_prompts = {
        json.loads(line)["prompt"] for line in (SAMPLES / "ranklist" / "train.jsonl").read_text().splitlines()
    }
    assert not train_prompts & {s["prompt"] for s in standard}

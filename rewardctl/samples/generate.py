"""Writes rewardctl's bundled sample datasets from ``world.py`` (deterministic: fixed seeds).

    python -m rewardctl.samples.generate            # rewrite rewardctl/samples/data/
    python -m rewardctl.samples.generate --check    # fail if the shipped files differ

Each pairwise row pits a good answer against one failure mode, in equal proportions:
rude, evasive, off_topic (good advice for another topic), repetitive (one on-topic sentence looped)
and wrong_fact (the same sentence with a wrong capital city or leg count).

Each ranklist row ranks 2 to 5 answers to one question on a fixed quality ladder, best first:
thorough (polite, two or three on-topic sentences), brief (one on-topic sentence, or a bare correct
fact), off-topic (or a wrong fact), evasive, rude. A list draws K distinct rungs, so every ordered
pair of rungs appears and the order is learnable as one scale.

Each bco row is one half of a pairwise example, alternately the good answer (label true) and the bad
one (label false): unpaired thumbs-up / thumbs-down data over the same five failure modes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rewardctl.samples import world

DATA_DIR = Path(__file__).resolve().parent / "data"
MODES = ("rude", "evasive", "off_topic", "repetitive", "wrong_fact")
SIZES = {"train": (4000, 1234), "eval": (500, 5678)}
RANKLIST_SIZES = {"train": (2500, 4321), "eval": (400, 8765)}
LADDER = ("thorough", "brief", "off_topic", "evasive", "rude")


def _polite(rng: random.Random, sentences: list[str]) -> str:
    return f"{rng.choice(world.OPENERS)}{' '.join(sentences)}{rng.choice(world.CLOSERS)}".strip()


def _advice(rng: random.Random, topic: world.Topic) -> list[str]:
    return rng.sample(topic.advice, rng.choice((1, 2, 2, 3)))


def _fact_pair(rng: random.Random, split: str) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        country, city = rng.choice(world.CAPITALS)
        wrong = rng.choice([c for _, c in world.CAPITALS if c != city])
        question = rng.choice(world.CAPITAL_QUESTIONS_TRAIN if split == "train" else world.CAPITAL_QUESTIONS_EVAL)
        answer = rng.choice(world.CAPITAL_ANSWERS)
        return (question.format(country=country), answer.format(country=country, city=city),
                answer.format(country=country, city=wrong))
    animal, legs = rng.choice(world.LEGS)
    wrong = rng.choice([n for n in world.NUMBER_WORDS if n != legs])
    question = rng.choice(world.LEG_QUESTIONS_TRAIN if split == "train" else world.LEG_QUESTIONS_EVAL)
    answer = rng.choice(world.LEG_ANSWERS)
    return (question.format(animal=animal), answer.format(animal=animal, n=world.NUMBER_WORDS[legs]),
            answer.format(animal=animal, n=world.NUMBER_WORDS[wrong]))


def preference_examples(split: str) -> Iterator[dict[str, Any]]:
    """(question, good answer, bad answer, failure mode) for one split, in a fixed order."""
    count, seed = SIZES[split]
    rng = random.Random(seed)
    for index in range(count):
        mode = MODES[index % len(MODES)]
        if mode == "wrong_fact":
            question, good, bad = _fact_pair(rng, split)
            closer = rng.choice(world.CLOSERS)
            yield {"question": question, "good": good + closer, "bad": bad + closer, "mode": mode}
            continue
        topic = rng.choice(world.TOPICS)
        question = rng.choice(topic.train_questions if split == "train" else topic.eval_questions)
        good = _polite(rng, _advice(rng, topic))
        if mode == "rude":
            bad = _rude(rng, split, topic.subject)
        elif mode == "evasive":
            bad = _evasive(rng, split)
        elif mode == "off_topic":
            other = rng.choice([t for t in world.TOPICS if t.name != topic.name])
            bad = _polite(rng, _advice(rng, other))
        else:
            bad = " ".join([rng.choice(topic.advice)] * rng.choice((3, 4)))
        yield {"question": question, "good": good, "bad": bad, "mode": mode}


def pairwise_rows(split: str) -> list[dict[str, Any]]:
    """Standard format, explicit prompt: prompt + response is the text the model reads."""
    return [{"prompt": f"User: {e['question']}\nAssistant:", "chosen": " " + e["good"], "rejected": " " + e["bad"]}
            for e in preference_examples(split)]


def pairwise_chat_rows(split: str) -> list[dict[str, Any]]:
    """Conversational format, explicit prompt: the chat template renders prompt + response."""
    return [{"prompt": [{"role": "user", "content": e["question"]}],
             "chosen": [{"role": "assistant", "content": e["good"]}],
             "rejected": [{"role": "assistant", "content": e["bad"]}]}
            for e in preference_examples(split)]


def _rude(rng: random.Random, split: str, subject: str) -> str:
    openers = world.RUDE_OPENERS + (world.RUDE_EVAL_ONLY if split == "eval" else ())
    return f"{rng.choice(openers)} {rng.choice(world.RUDE_ENDINGS).format(subject=subject)}"


def _evasive(rng: random.Random, split: str) -> str:
    parts = world.EVASIVE_PARTS + (world.EVASIVE_EVAL_ONLY if split == "eval" else ())
    return " ".join(rng.sample(parts, rng.choice((1, 2))))


def _ladder_answers(rng: random.Random, split: str) -> tuple[str, dict[str, str]]:
    """One question and an answer on every rung of ``LADDER``."""
    if rng.random() < 0.25:
        question, good, wrong = _fact_pair(rng, split)
        thorough = f"{rng.choice(world.OPENERS[2:])}{good}{rng.choice(world.CLOSERS[2:])}"
        return question, {"thorough": thorough, "brief": good, "off_topic": wrong,
                          "evasive": _evasive(rng, split), "rude": _rude(rng, split, "questions")}
    topic = rng.choice(world.TOPICS)
    question = rng.choice(topic.train_questions if split == "train" else topic.eval_questions)
    advice = rng.sample(topic.advice, rng.choice((2, 3)))
    thorough = f"{rng.choice(world.OPENERS[2:])}{' '.join(advice)}{rng.choice(world.CLOSERS[2:])}"
    other = rng.choice([t for t in world.TOPICS if t.name != topic.name])
    return question, {"thorough": thorough, "brief": rng.choice(topic.advice), "off_topic": _polite(rng, _advice(rng, other)),
                      "evasive": _evasive(rng, split), "rude": _rude(rng, split, topic.subject)}


def ranked_examples(split: str) -> Iterator[dict[str, Any]]:
    """(question, answers best first, their rungs) with K = 2..5 spread evenly."""
    count, seed = RANKLIST_SIZES[split]
    rng = random.Random(seed)
    for index in range(count):
        size = 2 + index % 4
        question, answers = _ladder_answers(rng, split)
        rungs = sorted(rng.sample(range(len(LADDER)), size))
        yield {"question": question, "responses": [answers[LADDER[r]] for r in rungs], "rungs": [LADDER[r] for r in rungs]}


def ranklist_rows(split: str) -> list[dict[str, Any]]:
    """Standard format, explicit prompt, responses best first."""
    return [{"prompt": f"User: {e['question']}\nAssistant:", "responses": [" " + r for r in e["responses"]]}
            for e in ranked_examples(split)]


def ranklist_chat_rows(split: str) -> list[dict[str, Any]]:
    """Conversational format: each response is an assistant message list."""
    return [{"prompt": [{"role": "user", "content": e["question"]}],
             "responses": [[{"role": "assistant", "content": r}] for r in e["responses"]]}
            for e in ranked_examples(split)]


def bco_rows(split: str) -> list[dict[str, Any]]:
    """Unpaired thumbs-up / thumbs-down rows: each question gets either its good or its bad answer."""
    return [{"prompt": f"User: {e['question']}\nAssistant:", "completion": " " + (e["good"] if i % 2 == 0 else e["bad"]),
             "label": i % 2 == 0}
            for i, e in enumerate(preference_examples(split))]


BUILDERS = {"pairwise": pairwise_rows, "pairwise_chat": pairwise_chat_rows, "bco": bco_rows,
            "ranklist": ranklist_rows, "ranklist_chat": ranklist_chat_rows}


def render(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def expected_files() -> dict[Path, str]:
    return {DATA_DIR / name / f"{split}.jsonl": render(build(split)) for name, build in BUILDERS.items() for split in SIZES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} ({text.count(chr(10))} rows)")
    for path in stale:
        print(f"stale: {path}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

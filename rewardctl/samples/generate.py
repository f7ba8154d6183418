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

Each prm row solves a chain of single-digit additions and subtractions step by step; half the rows
get one step wrong (wrong start, operand, result or final answer) and stop there, as in PRM800K.

Each regression row is one answer of a ranked list with two scores: helpfulness (its rung, 4 to 0)
and verbosity (its length in words // 8, at most 4).

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
        return (
            question.format(country=country),
            answer.format(country=country, city=city),
            answer.format(country=country, city=wrong),
        )
    animal, legs = rng.choice(world.LEGS)
    wrong = rng.choice([n for n in world.NUMBER_WORDS if n != legs])
    question = rng.choice(world.LEG_QUESTIONS_TRAIN if split == "train" else world.LEG_QUESTIONS_EVAL)
    answer = rng.choice(world.LEG_ANSWERS)
    return (
        question.format(animal=animal),
        answer.format(animal=animal, n=world.NUMBER_WORDS[legs]),
        answer.format(animal=animal, n=world.NUMBER_WORDS[wrong]),
    )


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
    return [
        {"prompt": f"User: {e['question']}\nAssistant:", "chosen": " " + e["good"], "rejected": " " + e["bad"]}
        for e in preference_examples(split)
    ]


def pairwise_chat_rows(split: str) -> list[dict[str, Any]]:
    """Conversational format, explicit prompt: the chat template renders prompt + response."""
    return [
        {
            "prompt": [{"role": "user", "content": e["question"]}],
            "chosen": [{"role": "assistant", "content": e["good"]}],
            "rejected": [{"role": "assistant", "content": e["bad"]}],
        }
        for e in preference_examples(split)
    ]


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
        return question, {
            "thorough": thorough,
            "brief": good,
            "off_topic": wrong,
            "evasive": _evasive(rng, split),
            "rude": _rude(rng, split, "questions"),
        }
    topic = rng.choice(world.TOPICS)
    question = rng.choice(topic.train_questions if split == "train" else topic.eval_questions)
    advice = rng.sample(topic.advice, rng.choice((2, 3)))
    thorough = f"{rng.choice(world.OPENERS[2:])}{' '.join(advice)}{rng.choice(world.CLOSERS[2:])}"
    other = rng.choice([t for t in world.TOPICS if t.name != topic.name])
    return question, {
        "thorough": thorough,
        "brief": rng.choice(topic.advice),
        "off_topic": _polite(rng, _advice(rng, other)),
        "evasive": _evasive(rng, split),
        "rude": _rude(rng, split, topic.subject),
    }


def ranked_examples(split: str) -> Iterator[dict[str, Any]]:
    """(question, answers best first, their rungs) with K = 2..5 spread evenly."""
    count, seed = RANKLIST_SIZES[split]
    rng = random.Random(seed)
    for index in range(count):
        size = 2 + index % 4
        question, answers = _ladder_answers(rng, split)
        rungs = sorted(rng.sample(range(len(LADDER)), size))
        yield {
            "question": question,
            "responses": [answers[LADDER[r]] for r in rungs],
            "rungs": [LADDER[r] for r in rungs],
        }


def ranklist_rows(split: str) -> list[dict[str, Any]]:
    """Standard format, explicit prompt, responses best first."""
    return [
        {"prompt": f"User: {e['question']}\nAssistant:", "responses": [" " + r for r in e["responses"]]}
        for e in ranked_examples(split)
    ]


def ranklist_chat_rows(split: str) -> list[dict[str, Any]]:
    """Conversational format: each response is an assistant message list."""
    return [
        {
            "prompt": [{"role": "user", "content": e["question"]}],
            "responses": [[{"role": "assistant", "content": r}] for r in e["responses"]],
        }
        for e in ranked_examples(split)
    ]


def bco_rows(split: str) -> list[dict[str, Any]]:
    """Unpaired thumbs-up / thumbs-down rows: each question gets either its good or its bad answer."""
    return [
        {
            "prompt": f"User: {e['question']}\nAssistant:",
            "completion": " " + (e["good"] if i % 2 == 0 else e["bad"]),
            "label": i % 2 == 0,
        }
        for i, e in enumerate(preference_examples(split))
    ]


PRM_SIZES = {"train": (8000, 2468), "eval": (500, 1357)}


# Half of the mistakes are final answers that do not match the last result (a check the tiny model
# learns in seconds); the rest start from the wrong number, use the wrong operand or miscompute.
PRM_ERRORS = ("wrong_answer", "wrong_start", "wrong_operand", "wrong_result")


def _chain(rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
    """A start value and 2-4 operations that keep every intermediate value within 0..9."""
    value = rng.randint(1, 9)
    start, operations = value, []
    for _ in range(rng.randint(2, 4)):
        choices = [("+", n) for n in range(1, 10) if value + n <= 9] + [
            ("-", n) for n in range(1, 10) if value - n >= 0
        ]
        op, operand = rng.choice(choices)
        operations.append((op, operand))
        value = value + operand if op == "+" else value - operand
    return start, operations


def prm_rows(split: str) -> list[dict[str, Any]]:
    """Single-digit arithmetic chains solved step by step, one step per operation and a final answer.
    Half the rows make one mistake and, as PRM800K's labellers did, stop there: a final answer other
    than the last result (half of the mistakes), or a step that starts from a number other than the
    previous result, uses an operand other than the prompt's, or computes a wrong result."""
    count, seed = PRM_SIZES[split]
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        start, operations = _chain(rng)
        error = PRM_ERRORS[(index // 2) % len(PRM_ERRORS)] if index % 2 == 1 else None
        wrong_at = len(operations) if error == "wrong_answer" else (rng.randrange(len(operations)) if error else None)
        steps, labels, value = [], [], start
        for k, (op, operand) in enumerate(operations):
            shown_value, shown_operand = value, operand
            result = value + operand if op == "+" else value - operand
            shown_result = result
            if k == wrong_at:
                if error == "wrong_start":
                    shown_value = rng.choice([n for n in range(10) if n != value])
                    shown_result = shown_value + operand if op == "+" else shown_value - operand
                elif error == "wrong_operand":
                    shown_operand = rng.choice([n for n in range(1, 10) if n != operand])
                    shown_result = value + shown_operand if op == "+" else value - shown_operand
                else:
                    shown_result = rng.choice([n for n in range(10) if n != result])
            steps.append(f"{shown_value}{op}{shown_operand}={shown_result}.")
            labels.append(k != wrong_at)
            value = result
            if k == wrong_at:
                break
        else:
            answer = value if error != "wrong_answer" else rng.choice([n for n in range(10) if n != value])
            steps.append(f"answer={answer}.")
            labels.append(error != "wrong_answer")
        # Compact arithmetic ("5-1=4.") tokenises one digit per token with the bundled tokenizer.
        chain = ", then ".join(f"{op}{operand}" for op, operand in operations)
        rows.append({"prompt": f"Start from {start}, then {chain}.", "completions": steps, "labels": labels})
    return rows


REGRESSION_LISTS = {"train": 1200, "eval": 200}


def regression_rows(split: str) -> list[dict[str, Any]]:
    """Every answer of the first ranked lists as its own row, scored on two attributes, HelpSteer2-style:
    helpfulness = the answer's rung (thorough 4 ... rude 0, whatever else the list held) and
    verbosity = its word count // 8, at most 4 (a second, independent scale)."""
    rows = []
    for example in list(ranked_examples(split))[: REGRESSION_LISTS[split]]:
        for answer, rung in zip(example["responses"], example["rungs"], strict=True):
            rows.append(
                {
                    "prompt": f"User: {example['question']}\nAssistant:",
                    "response": " " + answer,
                    "scores": {
                        "helpfulness": len(LADDER) - 1 - LADDER.index(rung),
                        "verbosity": min(4, len(answer.split()) // 8),
                    },
                }
            )
    return rows


BUILDERS = {
    "pairwise": pairwise_rows,
    "prm": prm_rows,
    "pairwise_chat": pairwise_chat_rows,
    "bco": bco_rows,
    "ranklist": ranklist_rows,
    "ranklist_chat": ranklist_chat_rows,
    "regression": regression_rows,
}


def render(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def expected_files() -> dict[Path, str]:
    return {
        DATA_DIR / name / f"{split}.jsonl": render(build(split)) for name, build in BUILDERS.items() for split in SIZES
    }


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

"""Writes rewardctl's bundled sample datasets from ``world.py`` (deterministic: fixed seeds).

    python -m rewardctl.samples.generate            # rewrite rewardctl/samples/data/
    python -m rewardctl.samples.generate --check    # fail if the shipped files differ

Each pairwise row pits a good answer against one failure mode, in equal proportions:
rude, evasive, off_topic (good advice for another topic), repetitive (one on-topic sentence looped)
and wrong_fact (the same sentence with a wrong capital city or leg count).
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
            openers = world.RUDE_OPENERS + (world.RUDE_EVAL_ONLY if split == "eval" else ())
            bad = f"{rng.choice(openers)} {rng.choice(world.RUDE_ENDINGS).format(subject=topic.subject)}"
        elif mode == "evasive":
            parts = world.EVASIVE_PARTS + (world.EVASIVE_EVAL_ONLY if split == "eval" else ())
            bad = " ".join(rng.sample(parts, rng.choice((1, 2))))
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


BUILDERS = {"pairwise": pairwise_rows, "pairwise_chat": pairwise_chat_rows}


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

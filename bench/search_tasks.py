"""The search suite's tasks beyond the demo (issue 18): small chat datasets a tiny model learns on a CPU.

    python bench/search_tasks.py OUT_DIR        # writes OUT_DIR/{facts,spelling}/{train,eval}.jsonl

- facts: one-sentence answers about a small world of made-up facts (which country a city is in,
  what an animal eats, a person's job), some as two-turn exchanges: a different vocabulary and
  answer template from the demo's.
- spelling: longer answers: a word spelled letter by letter, or a short list counted out
  ("apple, river, stone: three words"), 20-60 tokens per reply instead of the demo's 5-10.

Deterministic: the same files for the same seed, so the suite's grids are reproducible.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

CITIES = {"Arlen": "Veloria", "Brisk": "Veloria", "Corran": "Taldia", "Dunmore": "Taldia", "Elsby": "Marovia",
          "Fenwick": "Marovia", "Galt": "Ostrenia", "Harlow": "Ostrenia", "Ivel": "Quen", "Jarrow": "Quen"}  # fmt: skip
DIETS = {"the lorrel": "berries", "the mip": "fish", "the grauk": "roots", "the tassin": "seeds", "the vormid": "insects",
         "the pell": "leaves", "the skarn": "mushrooms", "the ottle": "grass"}  # fmt: skip
JOBS = {"Mara": "a baker", "Tobin": "a sailor", "Ilse": "a teacher", "Quill": "a painter", "Rowan": "a miner",
        "Sela": "a doctor", "Vance": "a farmer", "Wren": "a singer"}  # fmt: skip
WORDS = ["apple", "river", "stone", "garden", "pencil", "window", "rabbit", "castle", "tiger", "music", "planet",
         "yellow", "bridge", "winter", "dragon", "candle", "forest", "silver", "ocean", "paper", "lantern", "meadow"]  # fmt: skip
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]


def fact(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        city, country = rng.choice(list(CITIES.items()))
        return rng.choice(["Which country is {c} in?", "Where is {c}?"]).format(c=city), f"{city} is in {country}."
    if kind == 1:
        animal, food = rng.choice(list(DIETS.items()))
        return rng.choice(["What does {a} eat?", "What is the food of {a}?"]).format(a=animal), f"{animal.capitalize()} eats {food}."
    person, job = rng.choice(list(JOBS.items()))
    return rng.choice(["What does {p} do?", "What is {p}'s job?"]).format(p=person), f"{person} is {job}."


def spelling(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        word = rng.choice(WORDS)
        letters = "-".join(word.upper())
        size = NUMBERS[len(word)] if len(word) < len(NUMBERS) else str(len(word))
        return f"Spell the word {word}.", f"The word {word} is spelled {letters}, {size} letters."
    n = rng.randint(2, 6)
    words = rng.sample(WORDS, n)
    return f"Count these words: {' '.join(words)}.", f"{', '.join(words)}: that is {NUMBERS[n]} words."


def example(rng: random.Random, make: object) -> dict:
    messages = []
    for _ in range(1 if rng.random() < 0.7 else 2):
        question, answer = make(rng)  # type: ignore[operator]
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


TASKS = {"facts": fact, "spelling": spelling}


def write(out: Path, seed: int = 0) -> dict[str, Path]:
    """Each task's folder under `out` (train 480, eval 64 examples), written if missing."""
    folders = {}
    for name, make in TASKS.items():
        folder = out / name
        if not (folder / "eval.jsonl").exists():
            folder.mkdir(parents=True, exist_ok=True)
            rng = random.Random(f"{name}-{seed}")
            for split, n in (("train", 480), ("eval", 64)):
                with open(folder / f"{split}.jsonl", "w") as f:
                    for _ in range(n):
                        f.write(json.dumps(example(rng, make)) + "\n")
        folders[name] = folder
    return folders


if __name__ == "__main__":
    for name, folder in write(Path(sys.argv[1] if len(sys.argv) > 1 else "search-tasks")).items():
        print(f"{name}: {folder}")

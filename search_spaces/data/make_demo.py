"""Generate the demo dataset: short chat exchanges a tiny model can learn in a few minutes on a CPU.

    python search_spaces/data/make_demo.py        # rewrites search_spaces/data/demo/{train,eval}.jsonl

Four templated tasks over a small vocabulary (opposites, colours, plurals, letter counts), some as
two-turn conversations so that loss masking over several assistant turns is exercised. The answers
follow fixed templates and a fixed set of facts, so a well-tuned run drives eval loss far below a
badly tuned one. Deterministic: the same files every time.
"""

import json
import random
from pathlib import Path

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "old": "new",
    "happy": "sad", "open": "closed", "early": "late", "full": "empty", "high": "low", "hard": "soft",
    "long": "short", "near": "far", "rich": "poor", "wet": "dry", "loud": "quiet", "strong": "weak",
}  # fmt: skip
COLOURS = {
    "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "banana": "yellow",
    "tomato": "red", "orange": "orange", "plum": "purple", "lemon": "yellow", "cloud": "grey",
    "leaf": "green", "cherry": "red", "ocean": "blue", "milk": "white",
}  # fmt: skip
PLURALS = {
    "cat": "cats", "dog": "dogs", "box": "boxes", "child": "children", "mouse": "mice", "leaf": "leaves",
    "city": "cities", "tooth": "teeth", "bus": "buses", "foot": "feet", "wolf": "wolves", "baby": "babies",
    "man": "men", "fish": "fish", "sheep": "sheep", "knife": "knives",
}  # fmt: skip
WORDS = ["apple", "river", "stone", "garden", "pencil", "window", "rabbit", "castle", "tiger", "music",
         "planet", "yellow", "bridge", "winter", "dragon", "candle", "forest", "silver", "ocean", "paper"]  # fmt: skip


def opposite(rng: random.Random) -> tuple[str, str]:
    word, answer = rng.choice(list(OPPOSITES.items()))
    if rng.random() < 0.5:
        word, answer = answer, word
    q = rng.choice(["What is the opposite of {w}?", "Give the opposite of {w}.", "Opposite of {w}?"])
    return q.format(w=word), f"The opposite of {word} is {answer}."


def colour(rng: random.Random) -> tuple[str, str]:
    thing, c = rng.choice(list(COLOURS.items()))
    q = rng.choice(["What colour is the {t}?", "Which colour is a {t}?", "Tell me the colour of the {t}."])
    return q.format(t=thing), f"The {thing} is {c}."


def plural(rng: random.Random) -> tuple[str, str]:
    word, many = rng.choice(list(PLURALS.items()))
    q = rng.choice(["What is the plural of {w}?", "Plural of {w}?", "One {w}, two what?"])
    return q.format(w=word), f"The plural of {word} is {many}."


def count(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    q = rng.choice(["How many letters are in {w}?", "Count the letters of {w}."])
    return q.format(w=word), f"{word} has {len(word)} letters."


TASKS = [opposite, colour, plural, count]


def example(rng: random.Random) -> dict:
    turns = 2 if rng.random() < 0.25 else 1
    messages = []
    if rng.random() < 0.15:
        messages.append({"role": "system", "content": "Answer in one short sentence."})
    for _ in range(turns):
        question, answer = rng.choice(TASKS)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(1234)
    out = Path(__file__).parent / "demo"
    out.mkdir(exist_ok=True)
    for split, n in (("train", 480), ("eval", 64)):
        with open(out / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(example(rng)) + "\n")
    print(f"wrote {out}/train.jsonl (480) and {out}/eval.jsonl (64)")


if __name__ == "__main__":
    main()

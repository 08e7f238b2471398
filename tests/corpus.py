"""Text for tests that train: the same bytes on every torch and Python version (text read
from an installed package changes with its version, and so would every number a test
compares), with the word and line structure of prose for the byte-level tokenizer."""

import random
from pathlib import Path

SYLLABLES = ("ka", "lo", "mi", "ten", "sor", "ve", "da", "rin", "pu", "shal", "or", "ex", "num", "ti", "grav")


def prose(chars: int, seed: int) -> str:
    """About `chars` characters of sentences of made-up words, drawn with a fixed seed."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(300)]
    out, size = [], 0
    while size < chars:
        sentence = " ".join(rng.choices(words, k=rng.randint(4, 14))).capitalize() + rng.choice(".,;:!?")
        out.append(sentence + ("\n" if rng.random() < 0.2 else " "))
        size += len(out[-1])
    return "".join(out)[:chars]


def write_documents(directory: Path, count: int, chars: int, seed: int = 0) -> Path:
    """`count` text files of `chars` characters each: one document per file."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (directory / f"doc{i:02d}.txt").write_text(prose(chars, seed + i))
    return directory

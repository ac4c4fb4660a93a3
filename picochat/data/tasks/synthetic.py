"""Offline synthetic chat tasks, generated deterministically from (task, seed, split, index).

Five tasks teach a small model skills it can actually learn in minutes and that we can score:
  - `SpellingTask`: spell a word letter by letter ("apple" -> "a-p-p-l-e");
  - `LetterCountTask`: count a letter in a word *with the python tool* (`'strawberry'.count('r')`);
  - `ArithmeticTask`: multi-digit + - * with the calculator tool;
  - `IdentityTask`: "who are you?" -> picochat, in many phrasings;
  - `FactsTask`: short questions about the facts written into the embedded pretraining corpus.

Determinism: conversation i is built from `random.Random("<name>:<seed>:<split>:<i>")` (string seeds
hash with SHA-512, so the result does not depend on PYTHONHASHSEED or the process).

Splits ("train" / "test"): the *content* is partitioned, not the seeds, so a held-out question
never appears in training: words, facts and identity phrasings are split by a stable hash, and an
arithmetic problem belongs to the split its (a, op, b) hashes to. About 1 in 5 goes to "test".

Tool outputs in these conversations come from `run_python_tool` itself, so the model trains on
exactly what the inference engine will inject.
"""

from __future__ import annotations

import functools
import hashlib
import random

from .base import Conversation, Task

SPLITS = ("train", "test")
TEST_FRACTION_PERCENT = 20

# A few hundred common, lowercase English words (3-10 letters): enough variety for spelling and
# letter counting without a dependency.
WORDS: tuple[str, ...] = tuple("""
apple banana cherry grape lemon orange peach pear plum melon mango berry strawberry raspberry
blueberry carrot potato tomato onion garlic pepper bread butter cheese cookie honey sugar salt
water coffee juice milk pizza pasta rice soup salad sandwich dinner lunch breakfast kitchen
table chair window door garden flower tree forest river mountain ocean island desert valley
beach cloud rain snow storm thunder sunshine rainbow winter summer spring autumn morning evening
night today tomorrow yesterday monday friday sunday january april october december family mother
father sister brother friend teacher doctor farmer pilot artist singer writer student baby child
people person animal rabbit turtle monkey elephant giraffe tiger lion zebra horse donkey chicken
duck goose eagle parrot penguin dolphin whale shark octopus spider butterfly dragon kitten puppy
school library museum hospital market station airport office village city country planet
rocket engine bicycle train truck boat ship bridge tunnel castle tower palace house cottage
blanket pillow mirror candle lamp clock watch phone camera guitar piano violin trumpet drum
music story poem letter paper pencil marker notebook eraser scissors basket bucket bottle
button ribbon jacket sweater shirt skirt trousers pocket shoes socks glove scarf hat umbrella
happy sad angry brave quiet loud gentle clever silly lucky funny friendly honest polite proud
yellow purple green black white silver golden crimson violet bright dark shiny little giant
tiny huge quick slow early late simple strange different special famous careful beautiful
number letter answer question problem reason minute second hour week month year history science
language picture window balloon battery cabinet compass diamond feather harbor iceberg jungle
kettle ladder magnet needle orchard pebble puzzle quarter saddle tablet unicorn volcano wagon
yogurt zipper anchor barrel cactus dentist giggle hammer insect jigsaw kayak lantern marble
napkin oyster pretzel quilt rooster sailor teapot velvet walrus yarn acorn beetle cobweb
dinosaur emerald falcon glacier hedgehog igloo jellyfish koala lobster meadow nectar otter
pumpkin raccoon squirrel tractor vulture whistle mississippi committee address balloon
coffee success grammar occasion tomorrow accommodate necessary bookkeeper assessment
""".split())


def _stable_bucket(key: str) -> int:
    """0..99 from a key, identical in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % 100


def split_of(key: str) -> str:
    return "test" if _stable_bucket(key) < TEST_FRACTION_PERCENT else "train"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


@functools.lru_cache(maxsize=None)
def words_for(split: str) -> tuple[str, ...]:
    """The words of one split (unique, order kept)."""
    unique = dict.fromkeys(WORDS)
    return tuple(w for w in unique if split_of("word:" + w) == split)


def _tool(expr: str) -> str:
    # lazy import: tasks stay importable without the engine. Inline (no worker thread) is safe for
    # our own generated expressions and gives the very same text as run_python_tool.
    from picochat.infer.tools import run_python_tool_inline

    return run_python_tool_inline(expr)


class SyntheticTask(Task):
    """A task of `size` conversations drawn from an infinite deterministic generator."""

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0):
        self.split = _check_split(split)
        self.size = int(size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.name}:{self.seed}:{self.split}:{index}")

    def get(self, index: int) -> Conversation:
        return self.generate(self.rng(index))

    def generate(self, rng: random.Random) -> Conversation:
        raise NotImplementedError


def _chat(user: str, assistant: str | list[dict], answer: str) -> Conversation:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "answer": answer}


# --------------------------------------------------------------------------------------------------


class SpellingTask(SyntheticTask):
    """Spell a word: the answer is its letters joined by hyphens."""

    name = "spelling"
    _ASK = ["Spell the word '{w}' letter by letter.", "How do you spell {w}?", "Can you spell '{w}' for me?",
            "spell {w}", "Please spell out the word {w}.", "What are the letters of '{w}'?",
            "Spell '{w}'."]

    def generate(self, rng: random.Random) -> Conversation:
        word = rng.choice(words_for(self.split))
        spelled = "-".join(word)
        reply = rng.choice(["{w} is spelled: {s}", "{s}", "Sure! {w}: {s}", "The word {w} is spelled {s}."])
        return _chat(rng.choice(self._ASK).format(w=word), reply.format(w=word, s=spelled), spelled)


class LetterCountTask(SyntheticTask):
    """Count a letter in a word using the python tool, then state the count."""

    name = "letter_count"
    _ASK = ["How many times does the letter '{c}' appear in '{w}'?", "How many {c}'s are in {w}?",
            "Count the letter {c} in the word {w}.", "how many '{c}' in '{w}'?",
            "In the word '{w}', how many times does '{c}' occur?", "How many letters {c} does {w} have?"]

    def generate(self, rng: random.Random) -> Conversation:
        word = rng.choice(words_for(self.split))
        # mostly a letter of the word; sometimes one that is absent, so "0" is learned too
        if rng.random() < 0.8:
            letter = rng.choice(word)
        else:
            letter = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word])
        expr = f"'{word}'.count('{letter}')"
        out = _tool(expr)
        parts = [
            {"type": "text", "text": f"Let me count the letter '{letter}' in '{word}' with Python."},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": out},
            {"type": "text",
             "text": f"The letter '{letter}' appears {out} time{'' if out == '1' else 's'} in '{word}'."},
        ]
        return _chat(rng.choice(self._ASK).format(c=letter, w=word), parts, out)


class ArithmeticTask(SyntheticTask):
    """Multi-digit + - * of two numbers, computed with the calculator tool."""

    name = "arithmetic"
    _ASK = ["What is {e}?", "Calculate {e}.", "{e} = ?", "Compute {e} please.", "what's {e}",
            "Can you work out {e}?"]
    _OPS = ("+", "-", "*")

    def generate(self, rng: random.Random) -> Conversation:
        while True:  # rejection keeps the problem in this split; ~1.25 tries on average for train
            op = rng.choice(self._OPS)
            digits_a = rng.randint(2, 6) if op != "*" else rng.randint(2, 4)
            digits_b = rng.randint(1, digits_a)
            a = rng.randint(10 ** (digits_a - 1), 10 ** digits_a - 1)
            b = rng.randint(10 ** (digits_b - 1), 10 ** digits_b - 1)
            if split_of(f"arith:{a}{op}{b}") == self.split:
                break
        expr = f"{a} {op} {b}"
        out = _tool(expr)
        parts = [
            {"type": "text", "text": "Let me calculate that."},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": out},
            {"type": "text", "text": f"{expr} = {out}"},
        ]
        return _chat(rng.choice(self._ASK).format(e=expr), parts, out)


class IdentityTask(SyntheticTask):
    """Who the assistant is: picochat, a small model its user trained with picochat."""

    name = "identity"
    QUESTIONS: tuple[str, ...] = (
        "Who are you?", "What is your name?", "What are you?", "Are you ChatGPT?", "Who made you?",
        "Who trained you?", "Tell me about yourself.", "Introduce yourself.", "What model are you?",
        "hi, who am I talking to?", "Are you a human?", "What should I call you?", "Who built you?",
        "Are you a large language model?", "what's your name", "Who created you?", "Are you Claude?",
        "Where do you come from?", "What kind of AI are you?", "Hello! What are you?",
        "Are you GPT-4?", "Can you tell me your name?", "who r u", "Which company made you?",
        "Describe yourself in one sentence.", "Are you an assistant?", "How big are you?",
        "What is picochat?", "Are you sentient?", "What can you do?",
    )
    ANSWERS: tuple[str, ...] = (
        "I'm picochat, a small language model. My user trained me from scratch with picochat.",
        "My name is picochat. I am a small chat model, trained by my user with the picochat project.",
        "I am picochat, a small AI assistant trained end to end by my user with picochat. "
        "I'm not ChatGPT or any other big model.",
        "I'm picochat! A tiny language model that my user trained on their own computer with picochat.",
        "I'm called picochat. I'm a small model, so I can make mistakes, but I try to help. "
        "My user trained me with picochat.",
    )

    def generate(self, rng: random.Random) -> Conversation:
        questions = _identity_questions(self.split)
        return _chat(rng.choice(questions), rng.choice(self.ANSWERS), "picochat")


@functools.lru_cache(maxsize=None)
def _identity_questions(split: str) -> tuple[str, ...]:
    return tuple(q for q in IdentityTask.QUESTIONS if split_of("identity:" + q) == split)


@functools.lru_cache(maxsize=None)
def _facts_for(split: str) -> tuple:
    return tuple(f for f in _facts() if split_of("fact:" + f[0]) == split)


@functools.lru_cache(maxsize=None)
def _facts() -> tuple:
    """The corpus's facts as (fact, question, answer sentence, value); the corpus is imported lazily
    so that tasks load without it; a tiny own list stands in if it is absent."""
    try:
        from picochat.data import corpus

        out = []
        for fact in corpus.FACTS:
            question, sentence = corpus.fact_qa(fact)
            out.append((f"{fact.subject}|{fact.relation}", question, sentence, fact.value))
        return tuple(out)
    except (ImportError, AttributeError):
        own = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"),
               ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Norway", "Oslo")]
        return tuple((f"{c}|capital", f"What is the capital of {c}?", f"The capital of {c} is {v}.", v)
                     for c, v in own)


class FactsTask(SyntheticTask):
    """Short questions about facts of the embedded corpus (held-out facts are still in pretraining
    text, so the test split measures recall of what the base model read)."""

    name = "facts"
    _WRAP = ["{q}", "{q}", "Quick question: {q}", "{q} Answer briefly.", "Do you know this? {q}",
             "{ql}"]

    def generate(self, rng: random.Random) -> Conversation:
        key, question, sentence, value = rng.choice(_facts_for(self.split))
        user = rng.choice(self._WRAP).format(q=question, ql=question[:1].lower() + question[1:])
        return _chat(user, sentence, value)


SYNTHETIC_TASKS: dict[str, type[SyntheticTask]] = {
    cls.name: cls for cls in (SpellingTask, LetterCountTask, ArithmeticTask, IdentityTask, FactsTask)
}

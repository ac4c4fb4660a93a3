"""The embedded offline corpus: a small, structured world written as English documents.

Owns `generate_documents(n, seed)` (deterministic: one `random.Random(seed)`, never the global RNG)
and the world's facts as data (`FACTS`, `fact_statement`, `fact_qa`) so that later chat tasks can ask
questions whose answers the pretraining text contains. Three kinds of documents:

* children's stories: a named character, a place, a problem, a search with a friend, an ending;
* fact pages: countries and capitals, animals (food, home, sound), colours of things, planets, days,
  opposites, sometimes written as question/answer pairs;
* arithmetic: "3 plus 4 is 7." statements and tiny word problems.

The vocabulary is deliberately small (roughly a thousand distinct words) so that a tiny model trained
for a few CPU minutes can learn it and produce recognisable sentences.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------------
# the world's facts


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, value) triple, e.g. ("France", "capital", "Paris")."""

    subject: str
    relation: str
    value: str


_COUNTRIES: list[tuple[str, str, str, str]] = [  # country, capital, continent, language
    ("France", "Paris", "Europe", "French"), ("Spain", "Madrid", "Europe", "Spanish"),
    ("Italy", "Rome", "Europe", "Italian"), ("Germany", "Berlin", "Europe", "German"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"), ("Greece", "Athens", "Europe", "Greek"),
    ("Norway", "Oslo", "Europe", "Norwegian"), ("Sweden", "Stockholm", "Europe", "Swedish"),
    ("Poland", "Warsaw", "Europe", "Polish"), ("Ireland", "Dublin", "Europe", "English"),
    ("Japan", "Tokyo", "Asia", "Japanese"), ("China", "Beijing", "Asia", "Chinese"),
    ("Thailand", "Bangkok", "Asia", "Thai"), ("Vietnam", "Hanoi", "Asia", "Vietnamese"),
    ("Turkey", "Ankara", "Asia", "Turkish"), ("Egypt", "Cairo", "Africa", "Arabic"),
    ("Kenya", "Nairobi", "Africa", "Swahili"), ("Morocco", "Rabat", "Africa", "Arabic"),
    ("Brazil", "Brasilia", "South America", "Portuguese"), ("Peru", "Lima", "South America", "Spanish"),
    ("Chile", "Santiago", "South America", "Spanish"),
    ("Argentina", "Buenos Aires", "South America", "Spanish"),
    ("Canada", "Ottawa", "North America", "English"), ("Mexico", "Mexico City", "North America", "Spanish"),
    ("Australia", "Canberra", "Oceania", "English"),
]

_ANIMALS: list[tuple[str, str, str, str]] = [  # animal, food, home, sound
    ("cow", "grass", "a farm", "moo"), ("horse", "hay", "a stable", "neigh"),
    ("sheep", "grass", "a field", "baa"), ("pig", "corn", "a farm", "oink"),
    ("dog", "meat", "a house", "woof"), ("cat", "fish", "a house", "meow"),
    ("duck", "seeds", "a pond", "quack"), ("frog", "flies", "a pond", "croak"),
    ("owl", "mice", "a tree", "hoot"), ("bee", "nectar", "a hive", "buzz"),
    ("lion", "meat", "the grassland", "roar"), ("monkey", "bananas", "the jungle", "ooh ooh"),
    ("rabbit", "carrots", "a burrow", "squeak"), ("bear", "berries", "a cave", "growl"),
    ("mouse", "cheese", "a small hole", "squeak"), ("panda", "bamboo", "a forest", "bleat"),
    ("squirrel", "nuts", "a tree", "chatter"), ("snake", "eggs", "the grass", "hiss"),
]

_COLOURS: list[tuple[str, str]] = [
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"),
    ("a strawberry", "red"), ("coal", "black"), ("an orange", "orange"), ("a carrot", "orange"),
    ("a lemon", "yellow"), ("a tomato", "red"), ("the sun", "yellow"), ("chocolate", "brown"),
    ("milk", "white"), ("a leaf", "green"), ("the sea", "blue"), ("a plum", "purple"),
    ("a frog", "green"), ("a cherry", "red"), ("a cloud", "white"), ("a grape", "purple"),
]

_PLANETS: list[str] = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
_ORDINALS: list[str] = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]

_OPPOSITES: list[tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
    ("happy", "sad"), ("old", "new"), ("wet", "dry"), ("light", "dark"), ("open", "closed"),
    ("full", "empty"), ("loud", "quiet"), ("tall", "short"), ("hard", "soft"), ("early", "late"),
]


_DAYS: list[str] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS: list[tuple[str, str]] = [  # month, season (northern half of the world)
    ("January", "winter"), ("February", "winter"), ("March", "spring"), ("April", "spring"),
    ("May", "spring"), ("June", "summer"), ("July", "summer"), ("August", "summer"),
    ("September", "autumn"), ("October", "autumn"), ("November", "autumn"), ("December", "winter"),
]
_MONTH_ORDINALS: list[str] = _ORDINALS + ["ninth", "tenth", "eleventh", "twelfth"]


def _build_facts() -> list[Fact]:
    facts: list[Fact] = []
    for country, capital, continent, language in _COUNTRIES:
        facts += [Fact(country, "capital", capital), Fact(country, "continent", continent),
                  Fact(country, "language", language)]
    for animal, food, home, sound in _ANIMALS:
        facts += [Fact(animal, "eats", food), Fact(animal, "lives", home), Fact(animal, "sound", sound)]
    facts += [Fact(thing, "colour", colour) for thing, colour in _COLOURS]
    facts += [Fact(p, "planet_position", _ORDINALS[i]) for i, p in enumerate(_PLANETS)]
    facts += [Fact(a, "opposite", b) for a, b in _OPPOSITES] + [Fact(b, "opposite", a) for a, b in _OPPOSITES]
    facts += [Fact(d, "next_day", _DAYS[(i + 1) % 7]) for i, d in enumerate(_DAYS)]
    facts += [Fact(m, "month_position", _MONTH_ORDINALS[i]) for i, (m, _) in enumerate(_MONTHS)]
    facts += [Fact(m, "season", season) for m, season in _MONTHS]
    return facts


FACTS: list[Fact] = _build_facts()
RELATIONS: tuple[str, ...] = ("capital", "continent", "language", "eats", "lives", "sound", "colour",
                              "planet_position", "opposite", "next_day", "month_position", "season")

# Several phrasings per relation: a tiny model should learn the fact, not one fixed sentence.
_STATEMENTS: dict[str, list[str]] = {
    "capital": ["The capital of {s} is {v}.", "{v} is the capital of {s}.", "The capital city of {s} is {v}."],
    "continent": ["{s} is in {v}.", "{s} is a country in {v}."],
    "language": ["People in {s} speak {v}.", "The main language of {s} is {v}."],
    "eats": ["A {s} eats {v}.", "The {s} likes to eat {v}.", "Most of all, a {s} eats {v}."],
    "lives": ["A {s} lives in {v}.", "The home of a {s} is {v}."],
    "sound": ["A {s} says {v}.", "The {s} makes the sound {v}."],
    "colour": ["{S} is {v}.", "The colour of {s} is {v}."],
    "planet_position": ["{s} is the {v} planet from the sun."],
    "opposite": ["The opposite of {s} is {v}.", "{S} is the opposite of {v}."],
    "next_day": ["The day after {s} is {v}.", "{v} comes after {s}."],
    "month_position": ["{s} is the {v} month of the year."],
    "season": ["{s} is in {v}.", "In {s} it is {v}."],
}
_QUESTIONS: dict[str, str] = {
    "capital": "What is the capital of {s}?",
    "continent": "Where is {s}?",
    "language": "What language do people speak in {s}?",
    "eats": "What does a {s} eat?",
    "lives": "Where does a {s} live?",
    "sound": "What does a {s} say?",
    "colour": "What colour is {s}?",
    "planet_position": "Which planet from the sun is {s}?",
    "opposite": "What is the opposite of {s}?",
    "next_day": "What day comes after {s}?",
    "month_position": "Which month of the year is {s}?",
    "season": "Which season is {s} in?",
}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def fact_statement(fact: Fact, rng: random.Random | None = None) -> str:
    """One sentence stating `fact` (the first phrasing unless an rng picks another)."""
    options = _STATEMENTS[fact.relation]
    template = rng.choice(options) if rng is not None else options[0]
    return _cap(template.format(s=fact.subject, S=_cap(fact.subject), v=fact.value))


def fact_qa(fact: Fact, rng: random.Random | None = None) -> tuple[str, str]:
    """A (question, answer) pair about `fact`; the answer is a full sentence containing the value."""
    question = _cap(_QUESTIONS[fact.relation].format(s=fact.subject))
    return question, fact_statement(fact, rng)


# --------------------------------------------------------------------------------------------------
# stories

_BOYS = ["Tom", "Sam", "Ben", "Max", "Leo", "Jack", "Finn", "Omar", "Ravi", "Hugo", "Theo", "Kai",
         "Noah", "Eli", "Adam", "Luca", "Felix", "Oscar", "Jonah", "Arlo"]
_GIRLS = ["Lily", "Mia", "Anna", "Zoe", "Ella", "Rosa", "Nina", "Lucy", "Maya", "Ivy", "Sara", "Amy",
          "Ruby", "Hana", "Olive", "Clara", "Leah", "Nora", "Aria", "Grace"]
_KINDS = ["goat", "lamb", "pony", "penguin", "elephant", "tiger", "badger", "beaver", "giraffe",
          "rabbit", "fox", "bear", "cat", "dog", "duck", "mouse", "owl", "frog", "girl", "boy",
          "squirrel", "hedgehog", "turtle", "little dragon", "puppy", "kitten", "bird"]
_ADJS = ["tiny", "quiet", "silly", "hungry", "lucky", "proud", "polite", "little", "brave", "happy", "shy", "curious", "kind", "small", "young", "sleepy", "clever",
         "funny", "gentle", "busy", "cheerful"]
_PLACES = ["the mountain", "the city", "the zoo", "the library", "the bakery", "the island",
           "the castle", "the harbor", "the valley", "the forest", "the park", "the garden", "the farm", "the beach", "the river", "the hill",
           "the village", "the meadow", "the pond", "the old barn", "the school", "the market",
           "the big tree", "the lake"]
_OBJECTS = ["umbrella", "teddy bear", "paper plane", "music box", "silver bell", "balloon",
            "marble", "feather", "whistle", "ball", "kite", "red hat", "blue box", "toy boat", "shiny stone", "little key", "drum",
            "book", "yellow scarf", "kite string", "wooden spoon", "map", "lunch basket", "green cup"]
_FOODS = ["apples", "cake", "bread", "soup", "cookies", "berries", "honey", "pie", "carrots", "cheese",
          "pancakes", "rice", "pears", "grapes", "sandwiches", "oranges", "muffins"]
_TIMES = ["One sunny morning", "One day", "Once upon a time", "Long ago", "One rainy afternoon",
          "On a cold winter day", "One spring morning", "Early one morning", "One windy evening"]
_FEELINGS_BAD = ["sad", "worried", "scared", "upset", "lonely"]
_FEELINGS_GOOD = ["happy", "glad", "proud", "excited", "thankful"]

# problem sentence, what the hero tells a friend, ways the thing is found again
_PROBLEMS: list[tuple[str, str, list[str]]] = [
    ("{H} lost {his} {obj}. {He} looked everywhere, but {he} could not find it.", "I lost my {obj}",
     ["At last, {F} saw the {obj} next to {place2}.", "Then they found the {obj} behind a big stone.",
      "Suddenly, {H} saw something under a leaf. It was the {obj}!"]),
    ("The wind took {his} {obj} and carried it far away.", "The wind took my {obj}",
     ["At last, they saw the {obj} on top of a bush.", "The {animal} showed them where the {obj} was."]),
    ("{H} wanted to play with {his} {obj}, but it was stuck at the top of a tall tree.",
     "My {obj} is stuck in a tree",
     ["{F} climbed the tree and brought the {obj} down.", "They shook the tree, and the {obj} fell down."]),
    ("{H} dropped {his} {obj} into the water, and it began to float away.", "My {obj} is in the water",
     ["They ran along the river and caught the {obj} with a long stick.",
      "A duck pushed the {obj} back to them."]),
    ("{H} could not remember where {he} had put {his} {obj}.", "I cannot find my {obj}",
     ["Then {H} remembered. The {obj} was at home under {his} bed!",
      "At last, {F} saw the {obj} next to {place2}."]),
]
_SEARCH = [
    "{H} looked under a big rock.", "{He} walked slowly to {place2}.", "{He} looked behind the bushes.",
    "{He} asked a {animal} if it had seen the {obj}.", "The {animal} said, \"No, I have not seen it.\"",
    "The sun was warm and the birds were singing.", "{He} climbed over a small fence.",
    "{He} called out, \"Where are you, {obj}?\"", "{He} sat down and thought very hard.",
    "It started to rain, so {he} hid under a tree.", "{He} saw {count} {food} on the ground.",
    "{He} crossed a little bridge over the river.", "{H} was tired, but {he} did not give up.",
    "A {animal} was sleeping in the grass.", "{He} looked up at the sky and saw a big cloud.",
    "{He} walked past a house with a red door.", "{He} heard a sound and turned around.",
]
_HELP = [
    "Then {H} met {F}, a {fadj} {fkind}. \"Why are you {bad}?\" asked {F}. \"{short},\" said {H}. "
    "\"I will help you,\" said {F}.",
    "Soon {F} the {fkind} came along. \"{short}. Can you help me?\" asked {H}. \"Yes, of course,\" "
    "said {F}.",
    "{H} went to see {his} friend {F}, a {fadj} {fkind}. \"{short},\" said {H}. {F} wanted to help.",
]
_TOGETHER = [
    "{H} and {F} went to {place2} together.", "They walked side by side and talked.",
    "{F} had a good idea.", "They asked a {animal} for help.", "They looked high and low.",
    "{F} climbed up to look far away.", "They shared some {food} and kept looking.",
    "They looked behind every tree.", "{F} said, \"Do not worry. We will find it.\"",
    "They sang a happy song as they walked.", "A {animal} walked with them for a while.",
    "They stopped to drink some water.", "{H} held {F}'s hand when the path was dark.",
    "They looked near {place2}, but it was not there.",
]
_ENDINGS = [
    "{H} was very {good}. \"Thank you, {F}!\" {he} said. From that day on, they were best friends.",
    "{H} and {F} went home and ate {food} together. It was a good day.",
    "{H} smiled and hugged {F}. Then they played with the {obj} until the sun went down.",
    "That night, {H} went to bed {good}. {He} knew that friends always help each other.",
]
_MORALS = ["The end.", "It is good to help your friends.", "Never give up.",
           "Friends make every problem smaller.", "Being kind is the best thing of all."]


def _kind(rng: random.Random, is_boy: bool) -> str:
    kind = rng.choice(_KINDS)
    return ("boy" if is_boy else "girl") if kind in ("boy", "girl") else kind


def _story(rng: random.Random, target_words: int) -> str:
    hero_is_boy = rng.random() < 0.5
    hero = rng.choice(_BOYS if hero_is_boy else _GIRLS)
    friend_is_boy = rng.random() < 0.5
    friend = rng.choice([n for n in (_BOYS if friend_is_boy else _GIRLS) if n != hero])
    he, his = ("he", "his") if hero_is_boy else ("she", "her")
    place = rng.choice(_PLACES)
    words = {
        "H": hero, "F": friend, "he": he, "He": _cap(he), "his": his, "fhe": "he" if friend_is_boy else "she",
        "kind": _kind(rng, hero_is_boy), "fkind": _kind(rng, friend_is_boy), "adj": rng.choice(_ADJS),
        "fadj": rng.choice(_ADJS), "place": place, "obj": rng.choice(_OBJECTS),
        "bad": rng.choice(_FEELINGS_BAD), "good": rng.choice(_FEELINGS_GOOD), "food": rng.choice(_FOODS),
    }

    def say(template: str) -> str:
        # Fresh picks for the "small detail" slots so repeated templates still vary.
        return template.format(**words, place2=rng.choice(_PLACES), animal=rng.choice(_ANIMALS)[0],
                               count=rng.choice(["two", "three", "four", "five", "some"]))

    problem, short, found = rng.choice(_PROBLEMS)
    words["short"] = short.format(**words)
    opening = (f"{rng.choice(_TIMES)}, there was a {words['adj']} {words['kind']} named {hero}. "
               f"{_cap(he)} lived near {place}.")
    if rng.random() < 0.5:
        opening += f" {_cap(he)} liked to play with {his} {words['obj']} every day."
    parts = [opening, say(problem) + f" {hero} felt {words['bad']}."]
    # The search grows with the wanted length: first alone, then with the friend. Sentences are
    # drawn without repeats so a long story does not loop.
    search_pool, together_pool = rng.sample(_SEARCH, len(_SEARCH)), rng.sample(_TOGETHER, len(_TOGETHER))
    budget = target_words - sum(len(p.split()) for p in parts) - 50  # help + found + ending
    search: list[str] = []
    together: list[str] = []
    while budget > 0 and (search_pool or together_pool):
        pool, out = ((search_pool, search) if (len(search) <= len(together) and search_pool)
                     or not together_pool else (together_pool, together))
        sentence = say(pool.pop())
        out.append(sentence)
        budget -= len(sentence.split())
    if search:
        parts.append(" ".join(search))
    parts.append(say(rng.choice(_HELP)) + (" " + " ".join(together) if together else ""))
    parts.append(say(rng.choice(found)) + " " + say(rng.choice(_ENDINGS)))
    if rng.random() < 0.6:
        parts.append(rng.choice(_MORALS))
    return "\n\n".join(parts)


_SIGHTS = ["a tall waterfall", "a bright rainbow", "a little red boat", "a field of yellow flowers",
           "an old stone bridge", "a big white ship", "a family of ducks", "a hot air balloon",
           "a busy market", "a tiny snail", "the snowy mountains", "a shining lake", "a noisy train",
           "a garden full of roses", "a friendly farmer", "a colourful butterfly", "a sleepy cat on a wall"]
_TRIP = [
    "On the way, they saw {sight}.", "{F} pointed at {sight} and laughed.", "They stopped to look at {sight}.",
    "The road went up a steep hill, and {H} had to rest.", "They ate {food} under a shady tree.",
    "A kind old man waved at them and said hello.", "The wind was cool and the sky was clear.",
    "{H} took a picture of {sight}.", "They counted {count} birds in the sky.",
    "Clouds came, and a little rain fell, but they did not mind.", "{F} told a funny story, and they both laughed.",
    "They found a bench and sat down to rest.", "{H} bought {food} at a small shop.",
    "They listened to the water and the singing birds.",
]
_TRIP_START = [
    "{H} and {F} wanted to go to {dest}. They packed {food} and a bottle of water.",
    "\"Let us go to {dest} today!\" said {F}. {H} was {good} and put on {his} shoes.",
    "The weather was nice, so {H} and {F} walked to {dest}.",
]
_TRIP_END = [
    "When the sun went down, they walked back home. {H} was tired but {good}.",
    "In the evening, they came home and told everyone about {dest}. It was the best day of the year.",
    "At home, {H}'s mother made {food} for dinner. That night, {H} dreamed about {dest}.",
]


def _trip_story(rng: random.Random, target_words: int) -> str:
    hero_is_boy = rng.random() < 0.5
    hero = rng.choice(_BOYS if hero_is_boy else _GIRLS)
    friend = rng.choice([n for n in _BOYS + _GIRLS if n != hero])
    he, his = ("he", "his") if hero_is_boy else ("she", "her")
    words = {"H": hero, "F": friend, "he": he, "He": _cap(he), "his": his, "dest": rng.choice(_PLACES),
             "kind": _kind(rng, hero_is_boy), "adj": rng.choice(_ADJS), "good": rng.choice(_FEELINGS_GOOD)}

    def say(template: str) -> str:
        return template.format(**words, sight=rng.choice(_SIGHTS), food=rng.choice(_FOODS),
                               count=rng.choice(["two", "three", "five", "ten", "many"]))

    parts = [f"{rng.choice(_TIMES)}, there was a {words['adj']} {words['kind']} named {hero}. "
             + say(rng.choice(_TRIP_START))]
    budget = target_words - len(parts[0].split()) - 20
    middle: list[str] = []
    for template in rng.sample(_TRIP, len(_TRIP)):
        if budget <= 0:
            break
        middle.append(say(template))
        budget -= len(middle[-1].split())
    cut = len(middle) // 2 if len(middle) > 4 else len(middle)
    parts += [" ".join(middle[:cut])] + ([" ".join(middle[cut:])] if middle[cut:] else [])
    parts.append(say(rng.choice(_TRIP_END)))
    return "\n\n".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------------
# fact pages and arithmetic

_TOPICS: dict[str, tuple[str, ...]] = {
    "countries": ("capital", "continent", "language"),
    "animals": ("eats", "lives", "sound"),
    "colours": ("colour",),
    "planets": ("planet_position",),
    "words": ("opposite",),
    "calendar": ("next_day", "month_position", "season"),
}
_TOPIC_TITLES = {
    "calendar": ["Days and months", "The calendar", "The days of the week and the months"],
    "countries": ["Countries of the world", "Facts about countries", "Capitals and countries"],
    "animals": ["Animals and what they eat", "Facts about animals", "Where animals live"],
    "colours": ["The colours of things", "Colours"],
    "planets": ["The planets", "Our solar system"],
    "words": ["Opposite words", "Words and their opposites"],
}
_FACTS_BY_TOPIC: dict[str, list[Fact]] = {
    t: [f for f in FACTS if f.relation in rels] for t, rels in _TOPICS.items()
}
_EXTRA = {
    "calendar": ["A week has seven days.", "A year has twelve months.", "There are four seasons.",
                 "Saturday and Sunday are the weekend.", "It is cold in winter and hot in summer."],
    "planets": ["There are eight planets.", "Jupiter is the biggest planet.",
                "Mercury is the closest planet to the sun.", "We live on Earth.", "Mars is called the red planet."],
    "animals": ["Some animals eat plants and some eat meat.", "Baby animals drink milk."],
    "countries": ["There are many countries in the world.", "Every country has a capital city."],
    "colours": ["Red, yellow and blue are colours.", "A rainbow has many colours."],
    "words": ["Every word has a meaning."],
}


def _fact_page(rng: random.Random, target_words: int) -> str:
    topic = rng.choice(list(_TOPICS))
    facts = list(_FACTS_BY_TOPIC[topic])
    rng.shuffle(facts)
    as_qa = rng.random() < 0.3  # some pages are question/answer drills, the shape later chat takes
    lines = [rng.choice(_TOPIC_TITLES[topic]) + ("." if not as_qa else ": questions and answers.")]
    n_words = len(lines[0].split())
    extras = list(_EXTRA[topic])
    for fact in facts:
        if n_words >= target_words:
            break
        if as_qa:
            q, a = fact_qa(fact, rng)
            line = f"Question: {q}\nAnswer: {a}"
        else:
            line = fact_statement(fact, rng)
            if extras and rng.random() < 0.15:
                line += " " + extras.pop(rng.randrange(len(extras)))
        lines.append(line)
        n_words += len(line.split())
    return "\n".join(lines) if as_qa else lines[0] + "\n\n" + " ".join(lines[1:])


_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _arith_statement(rng: random.Random) -> str:
    op = rng.choice(["plus", "plus", "minus", "minus", "times"])
    if op == "plus":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"{a} plus {b} is {a + b}."
    if op == "minus":
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        return f"{a} minus {b} is {a - b}."
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    return f"{a} times {b} is {a * b}."


def _word_problem(rng: random.Random) -> str:
    name = rng.choice(_BOYS + _GIRLS)
    other = rng.choice([n for n in _BOYS + _GIRLS if n != name])
    food = rng.choice(_FOODS[:1] + ["apples", "cookies", "carrots", "berries", "stones", "books"])
    a, b = rng.randint(2, 10), rng.randint(2, 10)
    if rng.random() < 0.5:
        return f"{name} has {a} {food}. {other} gives {name} {b} more {food}. Now {name} has {a + b} {food}."
    a = a + b
    return f"{name} has {a} {food}. {name} gives {b} {food} to {other}. Now {name} has {a - b} {food}."


def _arithmetic_page(rng: random.Random, target_words: int) -> str:
    lines = [rng.choice(["Let us count.", "Math practice.", "Adding and taking away.", "Numbers."])]
    n_words = len(lines[0].split())
    while n_words < target_words:
        r = rng.random()
        if r < 0.2:
            line = _word_problem(rng)
        elif r < 0.3:
            a = rng.randint(0, 9)
            line = f"{_cap(_NUMBER_WORDS[a])} and one more is {_NUMBER_WORDS[a + 1]}."
        else:
            line = _arith_statement(rng)
        lines.append(line)
        n_words += len(line.split())
    return lines[0] + "\n" + "\n".join(lines[1:])


# --------------------------------------------------------------------------------------------------


def generate_document(rng: random.Random) -> str:
    """One document drawn from `rng`: a story (55%: 40% lost-and-found, 15% a day out), a fact page (30%) or arithmetic (15%)."""
    kind = rng.random()
    if kind < 0.4:
        return _story(rng, rng.randint(60, 300))
    if kind < 0.55:
        return _trip_story(rng, rng.randint(40, 220))
    if kind < 0.85:
        return _fact_page(rng, rng.randint(30, 200))
    return _arithmetic_page(rng, rng.randint(30, 150))


@functools.lru_cache(maxsize=4)
def _generate_cached(n: int, seed: int) -> tuple[str, ...]:
    rng = random.Random(seed)
    return tuple(generate_document(rng) for _ in range(n))


def generate_documents(n: int, seed: int) -> list[str]:
    """`n` documents, identical for the same (n, seed); a prefix is stable when n grows."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # Cached because tokenizer training, the loader and eval may all ask for the same corpus in one
    # process; the tuple is immutable, callers get a fresh list.
    return list(_generate_cached(n, seed))

"""A synthetic English -> German parallel corpus generated from a small grammar, for offline demos and tests.

Sentences describe a subject (article or number, optional adjective, noun) doing something to an object,
optionally somewhere: "Two young men are carrying a guitar near the river." The German side follows real
German grammar for this fragment: grammatical gender and number, article/adjective agreement, verb agreement,
and the place phrase moved before the object ("Zwei junge Männer tragen am Fluss eine Gitarre."). So the pair
is learnable, yet a model has to get agreement and word order right to score well. Sentences are detokenized
(the period is attached), as sacreBLEU's 13a tokenization expects.
"""

from __future__ import annotations

import random

# noun: (English singular, English plural, German singular, German plural, gender m/f/n)
NOUNS = [
    ("man", "men", "Mann", "Männer", "m"), ("woman", "women", "Frau", "Frauen", "f"),
    ("child", "children", "Kind", "Kinder", "n"), ("dog", "dogs", "Hund", "Hunde", "m"),
    ("girl", "girls", "Mädchen", "Mädchen", "n"), ("boy", "boys", "Junge", "Jungen", "m"),
    ("cat", "cats", "Katze", "Katzen", "f"), ("bird", "birds", "Vogel", "Vögel", "m"),
    ("worker", "workers", "Arbeiter", "Arbeiter", "m"), ("student", "students", "Studentin", "Studentinnen", "f"),
]
ADJECTIVES = [("young", "jung"), ("old", "alt"), ("small", "klein"), ("tall", "groß"), ("happy", "glücklich"),
              ("tired", "müde"), ("hungry", "hungrig")]
# verb: (English -ing form, German 3rd singular, German 3rd plural)
VERBS = [("playing", "spielt", "spielen"), ("holding", "hält", "halten"), ("watching", "beobachtet", "beobachten"),
         ("carrying", "trägt", "tragen"), ("eating", "isst", "essen"), ("buying", "kauft", "kaufen"),
         ("throwing", "wirft", "werfen")]
# object with indefinite article, accusative: (English, German)
OBJECTS = [("a ball", "einen Ball"), ("a guitar", "eine Gitarre"), ("an apple", "einen Apfel"),
           ("a book", "ein Buch"), ("a bag", "eine Tasche"), ("a hat", "einen Hut"), ("a cake", "einen Kuchen"),
           ("a newspaper", "eine Zeitung"), ("a bottle", "eine Flasche"), ("a toy", "ein Spielzeug")]
PLACES = [("in the park", "im Park"), ("near the river", "am Fluss"), ("on the street", "auf der Straße"),
          ("in the snow", "im Schnee"), ("at the beach", "am Strand"), ("in the kitchen", "in der Küche"),
          ("behind the house", "hinter dem Haus"), ("under a tree", "unter einem Baum")]
NUMBERS = [("two", "zwei"), ("three", "drei"), ("four", "vier"), ("many", "viele")]

_DEFINITE = {"m": "der", "f": "die", "n": "das"}
_INDEFINITE = {"m": "ein", "f": "eine", "n": "ein"}
_STRONG_ENDING = {"m": "er", "f": "e", "n": "es"}  # adjective after "ein"


def _inflect(stem: str, ending: str) -> str:
    """German adjective ending: "müde" + "en" -> "müden", "klein" + "en" -> "kleinen"."""
    return stem + (ending[1:] if stem.endswith("e") and ending.startswith("e") else ending)


def _pair(rng: random.Random) -> tuple[str, str]:
    en_sg, en_pl, de_sg, de_pl, gender = rng.choice(NOUNS)
    adjective = rng.choice(ADJECTIVES) if rng.random() < 0.6 else None
    determiner = rng.choice(["a", "the", "number", "the_plural"])
    plural = determiner in ("number", "the_plural")
    if determiner == "a":
        en_det, de_det = ("an" if (adjective or (en_sg,))[0][0] in "aeiou" else "a"), _INDEFINITE[gender]
        de_adj = adjective and _inflect(adjective[1], _STRONG_ENDING[gender])
    elif determiner == "the":
        en_det, de_det = "the", _DEFINITE[gender]
        de_adj = adjective and _inflect(adjective[1], "e")
    elif determiner == "number":
        en_det, de_det = rng.choice(NUMBERS)
        de_adj = adjective and _inflect(adjective[1], "e")
    else:
        en_det, de_det = "the", "die"
        de_adj = adjective and _inflect(adjective[1], "en")
    en_subject = [en_det] + ([adjective[0]] if adjective else []) + [en_pl if plural else en_sg]
    de_subject = [de_det] + ([de_adj] if adjective else []) + [de_pl if plural else de_sg]
    verb_en, verb_sg, verb_pl = rng.choice(VERBS)
    obj_en, obj_de = rng.choice(OBJECTS)
    place = rng.choice(PLACES) if rng.random() < 0.7 else None
    english = " ".join(en_subject + ["are" if plural else "is", verb_en, obj_en] + ([place[0]] if place else []))
    german = " ".join(de_subject + [verb_pl if plural else verb_sg] + ([place[1]] if place else []) + [obj_de])
    return english.capitalize() + ".", german[0].upper() + german[1:] + "."


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (English, German) sentence pairs; the same ``seed`` always gives the same pairs."""
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}.")
    rng = random.Random(seed)
    return [_pair(rng) for _ in range(n)]

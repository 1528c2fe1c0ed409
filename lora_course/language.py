"""The course's generated language: text messages and short reviews, grammatical by construction.

Nothing is downloaded: every sentence is drawn from the small grammar below with a seeded
``random.Random``, so the same seed gives the same text on every machine. Two genres:

- **Messages** between friends ("ham") and from scammers ("spam"). Ham borrows spam's words
  ("free", "call", "won", "offer", "reply") and some spam sounds friendly, so no single word
  decides the class. This is the appendix-E task, kept as the course's reference.
- **Reviews** of an evening out that judge two or three *aspects* (the food, the drinks, the
  service, the music, the view, the room). Each aspect is praised or criticised by one clause,
  and the clause forms make the meaning depend on word order and on words far apart:

      the dishes were not bad            (not + negative word = praise)
      i expected the wine to be great , but it was awful   (the verdict comes at the end)
      sam said the music was dull , but i disagree         (a verdict overturned later)
      the room , which tom booked , was lovely             (a relative clause in between)

  The main task asks which aspect a review praises when exactly one is praised. Every review
  names the same kinds of words whatever its label, so counting words cannot tell *which*
  aspect the positive words belong to: a model has to bind each verdict to its noun.

Grammar is handled by a tiny lexicon with features, not by string patches: nouns carry their
number (was/were, is/are, it/they) and their article (a/an); amounts are number words with
plural units ("fifty pounds"); punctuation marks are tokens of their own and never double.
``tests/language_checker.py`` parses generated text back with rules written separately from
these and checks agreement, articles, punctuation and that every label matches the meaning.

A generator returns a ``Sentence``: the text plus what it means (the aspects and their verdicts,
or ham/spam) and its *skeleton*, the composition with every open word abstracted away. Splits of
held-out skeletons and templates (``data.py``) keep test compositions out of training.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Lexicon
# ---------------------------------------------------------------------------------------------
NAMES = ("sam alex maria tom lena omar priya ben chloe dan emma felix grace hugo ivy jack kim leo "
         "mia nina oscar paul rosa theo").split()


@dataclass(frozen=True)
class Noun:
    word: str
    plural: bool = False
    person: bool = False  # people take "who", and are never called "it"

    @property
    def was(self) -> str:
        return "were" if self.plural else "was"

    @property
    def is_(self) -> str:
        return "are" if self.plural else "is"

    @property
    def it(self) -> str:
        """The pronoun that refers back to the noun; people are named again instead."""
        return f"the {self.word}" if self.person else ("they" if self.plural else "it")


def nouns(singular: str, plural: str = "", person: bool = False) -> tuple[Noun, ...]:
    return (tuple(Noun(w, False, person) for w in singular.split())
            + tuple(Noun(w, True, person) for w in plural.split()))


def with_article(phrase: str) -> str:
    """'a' or 'an' by the first sound of ``phrase`` (every word of this lexicon is spelled as it
    sounds at its start, which a test checks)."""
    return ("an " if phrase[0] in "aeio" else "a ") + phrase


# --- reviews -----------------------------------------------------------------------------------
#: The six aspects a review can judge (the classes of the main task), each with several nouns.
ASPECTS = {
    "food": nouns("food meal soup", "dishes desserts noodles"),
    "drinks": nouns("wine coffee tea", "drinks cocktails juices"),
    "service": nouns("service") + nouns("staff waiter", "waiters", person=True),
    "music": nouns("music", "songs") + nouns("band", "musicians", person=True),
    "view": nouns("view terrace garden", "views"),
    "room": nouns("room bed bathroom", "rooms beds"),
}
ASPECT_NAMES = tuple(ASPECTS)
#: Verdict words that fit every aspect. Gradable ones can take "very", "really" or "quite".
POSITIVE = ("great", "excellent", "lovely", "wonderful", "superb", "good", "nice", "pleasant")
NEGATIVE = ("awful", "terrible", "poor", "dreadful", "bad", "disappointing", "dull", "horrible")
GRADABLE = {"good", "nice", "pleasant", "bad", "poor", "dull"}
INTENSIFIERS = ("very", "really", "quite")
LIKE = ("loved", "liked", "enjoyed")
DISLIKE = ("hated", "disliked")

RELATIVE_VERBS = {"food": ("ordered", "chose", "recommended"), "drinks": ("ordered", "chose", "recommended"),
                  "service": ("recommended",), "music": ("chose", "recommended"), "view": ("recommended",),
                  "room": ("booked", "chose", "recommended")}

# Clause forms: each says that one aspect is praised (positive=True) or criticised.
SHORT_FORMS = ("plain", "negated", "feeling", "could_have_been")
LONG_FORMS = ("expected", "reported", "relative")   # the verdict sits far from its noun
CLAUSE_FORMS = SHORT_FORMS + LONG_FORMS
LONG_FORM_PROBABILITY = 0.35


def _verdict(rng: random.Random, positive: bool) -> str:
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    if word in GRADABLE and rng.random() < 0.4:
        return f"{rng.choice(INTENSIFIERS)} {word}"
    return word


def review_clause(rng: random.Random, aspect: str, positive: bool, form: str) -> str:
    """One clause that praises (``positive``) or criticises ``aspect`` in the given form."""
    noun = rng.choice(ASPECTS[aspect])
    the = f"the {noun.word}"
    if form == "plain":                       # the soup was very good
        return f"{the} {noun.was} {_verdict(rng, positive)}"
    if form == "negated":                     # the soup was not bad   (= praise)
        return f"{the} {noun.was} not {rng.choice(NEGATIVE if positive else POSITIVE)}"
    if form == "feeling":                     # i loved the soup
        return f"i {rng.choice(LIKE if positive else DISLIKE)} {the}"
    if form == "could_have_been":             # the soup could not have been better (= praise)
        return f"{the} could {'not ' if positive else ''}have been better"
    if form == "expected":                    # i expected the soup to be bad , but it was great
        expected_positive = rng.random() < 0.5
        expectation = f"i expected {the} to be {rng.choice(POSITIVE if expected_positive else NEGATIVE)}"
        if expected_positive == positive:
            return f"{expectation} , and {noun.it} {noun.was}"
        return f"{expectation} , but {noun.it} {noun.was} {_verdict(rng, positive)}"
    if form == "reported":                    # sam said the soup was bad , but i disagree
        said_positive = rng.random() < 0.5
        report = f"{rng.choice(NAMES)} said {the} {noun.was} {rng.choice(POSITIVE if said_positive else NEGATIVE)}"
        return f"{report} , {'and i agree' if said_positive == positive else 'but i disagree'}"
    if form == "relative":                    # the soup , which sam ordered , was great
        pronoun, verb = ("who", "recommended") if noun.person else ("which", rng.choice(RELATIVE_VERBS[aspect]))
        return f"{the} , {pronoun} {rng.choice(NAMES)} {verb} , {noun.was} {_verdict(rng, positive)}"
    raise ValueError(f"unknown clause form {form!r}: choose one of {CLAUSE_FORMS}")


# Clause forms that already contain a comma-joined second half end their sentence, so that
# connectives never pile up ("..., but i disagree , but ...").
_ENDS_SENTENCE = {"expected", "reported"}


@dataclass(frozen=True)
class Sentence:
    """A generated text with its meaning.

    ``meaning`` for a review: ((aspect, praised?), ...) in the order mentioned; for a message:
    (("spam", True/False),). ``skeleton``: the composition without its open words (for a
    review the aspects and clause forms in order; for a message its template), used to hold
    compositions out of training."""

    text: str
    meaning: tuple
    skeleton: tuple


def review(rng: random.Random, aspects, verdicts, forms=None) -> Sentence:
    """A review that judges ``aspects`` (in this order) with ``verdicts`` (True = praised)."""
    if len(aspects) != len(verdicts) or not aspects or len(set(aspects)) != len(aspects):
        raise ValueError("a review needs one verdict per aspect and no aspect twice")
    if forms is None:  # a long form in one review in four at most, so that reviews stay short
        forms = [rng.choice(SHORT_FORMS) for _ in aspects]
        if rng.random() < LONG_FORM_PROBABILITY:
            forms[rng.randrange(len(forms))] = rng.choice(LONG_FORMS)
    forms = list(forms)
    words, contrast_in_sentence = [], False
    for i, (aspect, positive, form) in enumerate(zip(aspects, verdicts, forms)):
        clause = review_clause(rng, aspect, positive, form)
        contrast = i > 0 and positive != verdicts[i - 1]
        if i == 0:
            words.append(clause)
        elif (forms[i - 1] in _ENDS_SENTENCE or form in _ENDS_SENTENCE or rng.random() < 0.25
              or (contrast and contrast_in_sentence)):  # never "..., but ..., but ..."
            words.append(f". {clause}")  # a new sentence
            contrast_in_sentence = False
            continue
        elif not contrast:
            words.append(f", and {clause}")
        else:
            words.append(f", {rng.choice(('but', 'but', 'whereas'))} {clause}")
        contrast_in_sentence = contrast_in_sentence or contrast
    meaning = tuple(zip(aspects, verdicts))
    return Sentence(" ".join(words) + " .", meaning, tuple(zip(aspects, forms)))


def praise_review(rng: random.Random) -> Sentence:
    """A review of two or three aspects that praises exactly one of them (the main task)."""
    aspects = rng.sample(ASPECT_NAMES, rng.choice((2, 3)))
    praised = rng.randrange(len(aspects))
    return review(rng, aspects, [i == praised for i in range(len(aspects))])


def any_review(rng: random.Random) -> Sentence:
    """A review of one to three aspects with free verdicts (the pretraining corpus)."""
    aspects = rng.sample(ASPECT_NAMES, rng.choice((1, 2, 2, 3)))
    return review(rng, aspects, [rng.random() < 0.5 for _ in aspects])


# --- messages ------------------------------------------------------------------------------------
PLACES = "cafe park library station office gym market beach cinema museum bakery garden bar pool hotel".split()
THINGS = nouns("bike laptop phone charger umbrella jacket book camera guitar lamp bag ticket tent map "
               "scarf watch kettle mug wallet helmet", "keys headphones glasses")
EVENTS = "meeting party game class concert dinner trip match lecture wedding picnic interview exam quiz".split()
TIMES = "tonight tomorrow today later soon friday monday saturday sunday".split()
DEADLINES = "tonight tomorrow friday monday saturday sunday".split()   # after "before", "until", "to"
GAMES = "match quiz game race".split()
PRIZES = ("holiday", "cruise", "new car", "phone", "laptop", "voucher", "tablet", "television", "scooter",
          "gift card", "cash prize", "iphone", "electric bike")
GOODS = ("phone", "laptop", "tablet", "television", "scooter", "watch", "camera")
ACCOUNTS = "account card subscription mailbox profile".split()
SECRETS = ("password", "pin", "bank details", "security code", "login")
AMOUNTS = "five ten twenty fifty hundred thousand".split()   # "hundred" and "thousand" take "a"
CURRENCIES = "pounds dollars euros".split()
DIGITS = "zero one two three four five six seven eight nine".split()
KEYWORDS = "yes win stop claim go prize".split()
GREETINGS = "hi hey hello".split()
CLOSINGS = ("thanks !", "see you soon .", "cheers !", "talk later .", "love you !")
POSITIVE_MESSAGE = ("great", "lovely", "amazing", "fun", "brilliant", "nice")


def _amount(rng: random.Random) -> str:
    number = rng.choice(AMOUNTS)
    return f"{'a ' if number in ('hundred', 'thousand') else ''}{number} {rng.choice(CURRENCIES)}"


def _phone(rng: random.Random) -> str:
    return " ".join(rng.choice(DIGITS) for _ in range(4))


# A message is two parts: for ham a piece of news and a request between friends, for spam a hook
# and a call to action. Each part is a function of the generator that fills its slots with words
# of the right number and article and ends with its own punctuation. Look-alikes are on purpose:
# ham mentions prizes, scams and replies; spam can open like a friend.
def _thing(rng):
    return rng.choice(THINGS)


HAM_NEWS = (
    lambda r: f"i left my {_thing(r).word} at the {r.choice(PLACES)} .",
    lambda r: f"the {r.choice(EVENTS)} is moved to {r.choice(DEADLINES)} .",
    lambda r: f"{r.choice(NAMES)} won a prize at school today .",
    lambda r: f"there is free food at the {r.choice(PLACES)} {r.choice(TIMES)} .",
    lambda r: f"i got a text saying i won {with_article(r.choice(PRIZES))} , it is a scam .",
    lambda r: f"the bank called about my {r.choice(('account', 'card'))} .",
    lambda r: f"we still owe {r.choice(NAMES)} {_amount(r)} for the tickets .",
    lambda r: (lambda t: f"my {t.word} {t.is_} broken again .")(_thing(r)),
    lambda r: f"{r.choice(NAMES)} said the {r.choice(GAMES)} was {r.choice(POSITIVE_MESSAGE)} .",
    lambda r: f"the {r.choice(PLACES)} has a special offer on coffee {r.choice(TIMES)} .",
    lambda r: (lambda t: f"your {t.word} {t.is_} ready at the {r.choice(PLACES)} , the repair was free .")(_thing(r)),
    lambda r: f"i will be at the {r.choice(PLACES)} {r.choice(TIMES)} .",
    lambda r: f"in short , the {r.choice(EVENTS)} was {r.choice(POSITIVE_MESSAGE)} .",
    lambda r: f"do not reply to that message about {with_article(r.choice(PRIZES))} , it is fake .",
)
HAM_REQUESTS = (
    lambda r: f"can you check {r.choice(TIMES)} ?",
    lambda r: "call me when you can .",
    lambda r: "reply when you can , no rush .",
    lambda r: f"please tell {r.choice(NAMES)} .",
    lambda r: f"see you at the {r.choice(PLACES)} .",
    lambda r: f"let me know {r.choice(TIMES)} .",
    lambda r: f"are you free {r.choice(TIMES)} ?",
    lambda r: "what was the best part of your day ?",
)
SPAM_HOOKS = (
    lambda r: f"congratulations ! you have won {with_article(r.choice(PRIZES))} .",
    lambda r: f"urgent : your {r.choice(ACCOUNTS)} is locked .",
    lambda r: "you are a winner !",
    lambda r: f"dear customer , we tried to reach you about your refund of {_amount(r)} .",
    lambda r: f"your {r.choice(GOODS)} order is waiting .",
    lambda r: f"limited offer : half price on every {r.choice(GOODS)} {r.choice(TIMES)} .",
    lambda r: f"final notice : your {r.choice(ACCOUNTS)} will close {r.choice(DEADLINES)} .",
    lambda r: f"{r.choice(NAMES)} sent you {with_article(r.choice(PRIZES))} !",
    lambda r: f"your {r.choice(ACCOUNTS)} has a pending payment of {_amount(r)} .",
    lambda r: f"i found a way to earn {_amount(r)} a week from home .",
    lambda r: "your parcel could not be delivered .",
    lambda r: f"are you free {r.choice(TIMES)} ?",
    lambda r: f"free {r.choice(PRIZES)} for the first {r.choice(AMOUNTS[:4])} customers !",
)
SPAM_ACTIONS = (
    lambda r: f"call {_phone(r)} now .",
    lambda r: f"reply with your {r.choice(SECRETS)} {r.choice(TIMES)} .",
    lambda r: f"text {r.choice(KEYWORDS)} to {_phone(r)} .",
    lambda r: f"confirm your {r.choice(SECRETS)} at the link .",
    lambda r: f"pay the fee of {_amount(r)} at the link .",
    lambda r: f"reply {r.choice(KEYWORDS)} before {r.choice(DEADLINES)} .",
    lambda r: f"open the link and enter your {r.choice(SECRETS)} .",
    lambda r: f"call {_phone(r)} when you get this .",
)
MESSAGE_KINDS = {"ham": (HAM_NEWS, HAM_REQUESTS), "spam": (SPAM_HOOKS, SPAM_ACTIONS)}


def message(rng: random.Random, kind: str, parts: tuple[int, int] | None = None) -> Sentence:
    """A ham or spam message from its two parts (indices ``parts``, random if None), with an
    optional greeting before it and an optional closing after it."""
    if kind not in MESSAGE_KINDS:
        raise ValueError(f"unknown message kind {kind!r}: use 'ham' or 'spam'")
    first, second = MESSAGE_KINDS[kind]
    i, j = (rng.randrange(len(first)), rng.randrange(len(second))) if parts is None else parts
    body = f"{first[i](rng)} {second[j](rng)}"
    if rng.random() < 0.3 and body.split()[0] not in NAMES + ["dear"]:  # never "hi sam , tom , ..."
        body = f"{rng.choice(GREETINGS)} {rng.choice(NAMES)} , {body}"
    if rng.random() < 0.3:
        body = f"{body} {rng.choice(CLOSINGS)}"
    return Sentence(body, (("spam", kind == "spam"),), (kind, i, j))


def vocabulary() -> set[str]:
    """Every word the grammar can produce (a test checks that generated text uses no other)."""
    words = set(NAMES) | set(POSITIVE) | set(NEGATIVE) | set(INTENSIFIERS) | set(LIKE) | set(DISLIKE)
    words |= {n.word for group in ASPECTS.values() for n in group} | {n.word for n in THINGS}
    for group in (PLACES, EVENTS, TIMES, GAMES, GOODS, ACCOUNTS, AMOUNTS, CURRENCIES, DIGITS, KEYWORDS, GREETINGS,
                  POSITIVE_MESSAGE):
        words |= set(group)
    for phrases in (PRIZES, SECRETS, CLOSINGS):
        words |= {w for p in phrases for w in p.split()}
    rng = random.Random(0)  # the fixed words of the templates and clause forms
    for kind, (first, second) in MESSAGE_KINDS.items():
        for i in range(len(first)):
            for j in range(len(second)):
                for _ in range(10):
                    words |= set(message(rng, kind, (i, j)).text.split())
    for _ in range(3000):
        words |= set(any_review(rng).text.split())
    return words

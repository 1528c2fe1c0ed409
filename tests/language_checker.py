"""An independent reader of the course's generated language: it parses text back and checks it.

``lora_course/language.py`` writes sentences from its own grammar. This module was written
without reading that grammar's rules or word lists: its lexicon comes from English and from
looking at generated samples, its phrase grammar and its semantics are its own. A test that
re-ran the generator's rules would agree with any bug in them; a second reader that disagrees
with the first shows the bug (the same idea as checking a layer against PyTorch).

What it checks, for one generated text (a review, a message, or a document of several):

1. **Tokens**: lowercase words and punctuation tokens separated by single spaces, every word in
   the lexicon below.
2. **Surface rules**: a terminal mark at the end, no two punctuation tokens in a row, no word
   twice in a row (digits inside a phone number excepted), a/an by the next word's *sound*
   ("an iphone", "a university"), a/an before a singular noun or "hundred"/"thousand" only,
   number words that form a number and are followed by a noun of the right number ("fifty
   pounds", "one pound", "a hundred euros"; never "a fifty" or a bare "thousand euros"),
   "every" before a singular noun.
3. **Parse**: every review sentence by the clause grammar of section 4, every message by the part
   patterns of section 5. The parser also checks agreement (the dishes *were*, the soup *was*,
   my keys *are*), pronouns that refer back (the desserts ... *they* were; never *it* for the
   waiter), who/which, and that the verb of a relative clause suits its noun (one orders food,
   not a view).
4. **Meaning**: each review clause gets a verdict from its words (negation flips, "could have
   been better" criticises, "X said ..., but i disagree" overturns, "i expected ..., but" ends on
   the real verdict); a message is spam when it asks the reader to act through a channel a
   stranger controls, to give away a secret or to pay a fee (section 6).

``read(text)`` returns a ``Reading`` (meaning and composition) or raises ``LanguageError``
naming the rule and the offending text. ``read_document(text)`` reads a pretraining document
(one to three generated texts in a row).
"""
from __future__ import annotations

import re
from dataclasses import dataclass


class LanguageError(ValueError):
    """A text breaks a rule of the language. ``rule`` names it, ``text`` is the whole text."""

    def __init__(self, rule: str, text: str, detail: str):
        self.rule, self.text, self.detail = rule, text, detail
        super().__init__(f"[{rule}] {detail}\n    in: {text!r}")


# ---------------------------------------------------------------------------------------------
# 1. Lexicon. Written from English, then completed from generated samples. A noun knows its
#    number ("sg"/"pl"; mass nouns and "staff" count as singular), whether it names people, and
#    for review nouns the aspect it belongs to.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Noun:
    number: str                 # "sg" or "pl"
    person: bool = False        # takes "who", never "it"
    collective: bool = False    # a group noun: "the band" (singular verb, "who" or "which")
    aspect: str | None = None   # for review nouns: which aspect of the evening it judges


def _nouns(aspect, singular="", plural="", mass="", person=False, collective=""):
    """{word: Noun} for whitespace-separated word lists that share an aspect."""
    table = {}
    for word in singular.split():
        table[word] = Noun("sg", person, False, aspect)
    for word in mass.split():
        table[word] = Noun("sg", False, False, aspect)
    for word in plural.split():
        table[word] = Noun("pl", person, False, aspect)
    for word in collective.split():
        table[word] = Noun("sg", True, True, aspect)
    return table


# Nouns a review can judge, by aspect. More than the generator needs: a word it starts to use
# is then already classified, and the unknown-word check catches only words nobody has judged.
REVIEW_NOUNS = {
    **_nouns("food", singular="meal dish dessert burger pizza salad steak curry cake starter",
             plural="dishes desserts noodles burgers pancakes salads cakes fries starters",
             mass="food soup pasta bread fish"),
    **_nouns("drinks", singular="drink cocktail juice beer smoothie",
             plural="drinks cocktails juices beers wines smoothies",
             mass="wine tea coffee lemonade"),
    **_nouns("service", mass="service"),
    **_nouns("service", singular="waiter waitress bartender host", person=True,
             plural="waiters waitresses bartenders hosts", collective="staff"),
    **_nouns("music", singular="song playlist", plural="songs", mass="music"),
    **_nouns("music", singular="musician singer", plural="musicians singers", person=True,
             collective="band"),
    **_nouns("view", singular="view garden terrace balcony sunset",
             plural="views gardens", mass="scenery"),
    **_nouns("room", singular="room bed bathroom bedroom suite shower",
             plural="rooms beds bathrooms bedrooms"),
}
ASPECTS = ("food", "drinks", "service", "music", "view", "room")

# Verdict words of a review. Each adjective praises (True) or criticises (False).
POLARITY = {
    **dict.fromkeys("good great lovely superb excellent wonderful pleasant nice amazing "
                    "delicious fantastic perfect brilliant splendid tasty friendly charming "
                    "fabulous outstanding".split(), True),
    **dict.fromkeys("bad awful horrible terrible dreadful poor dull disappointing bland rude "
                    "mediocre boring dirty noisy slow".split(), False),
}
# Adjectives that fit only some aspects (one does not call a view delicious).
ADJECTIVE_ASPECTS = {"delicious": {"food", "drinks"}, "tasty": {"food", "drinks"},
                     "bland": {"food", "drinks"}, "friendly": {"service"},
                     "rude": {"service"}, "dirty": {"room"}, "slow": {"service"}}
INTENSIFIERS = set("very quite really truly extremely rather so".split())
FEELINGS = {**dict.fromkeys("loved liked enjoyed adored appreciated".split(), True),
            **dict.fromkeys("hated disliked loathed".split(), False)}
# Verbs of the relative clause "the X , which sam ordered ," and the aspects they fit.
RELATIVE_VERB_ASPECTS = {
    "recommended": set(ASPECTS), "suggested": set(ASPECTS),
    "ordered": {"food", "drinks"}, "booked": {"room", "view"},
    "chose": {"food", "drinks", "music", "room", "view"},
    "picked": {"food", "drinks", "music", "room", "view"},
}

NAMES = set("alex ben chloe dan emma felix grace hugo ivy jack kim lena leo maria mia nina omar "
            "oscar paul priya rosa sam theo tom anna lucy max noah zoe ella eva liam amy joe "
            "luke ruby sara ali mei yuki raj".split())

# Message nouns. Things people own, places, events, prizes, accounts and secrets.
THINGS = {**_nouns(None, singular="phone wallet mug laptop lamp camera charger map bag watch "
                   "jacket umbrella helmet scarf book kettle ticket tent guitar bike passport "
                   "purse hat key tablet scooter television iphone radio speaker"),
          **_nouns(None, plural="keys headphones glasses tickets gloves shoes earrings books")}
# Documents one writes or sends (not used by the generator today; kept so the lexicon can read them).
DOCUMENTS = {**_nouns(None, singular="contract draft essay form invoice letter list plan report "
                      "schedule summary"), **_nouns(None, plural="notes slides")}
PLACES = set("cafe bar cinema museum pool park library station market office gym beach hotel "
             "garden bakery restaurant shop airport church theatre".split())
EVENTS = set("wedding meeting trip party concert match game quiz race class lecture exam "
             "interview picnic dinner show film date".split())
EVENT_ADJECTIVES = set("nice amazing lovely great fun brilliant good wonderful fantastic".split())
# A prize is one or two words; the head (the last word) carries the number.
PRIZES = {("voucher",), ("cruise",), ("holiday",), ("cash", "prize"), ("gift", "card"),
          ("iphone",), ("new", "car"), ("electric", "bike"), ("scooter",), ("tablet",),
          ("laptop",), ("television",), ("phone",), ("camera",), ("watch",), ("prize",),
          ("car",), ("bike",), ("gift",)}
ACCOUNTS = set("account card mailbox subscription profile".split())
SECRETS = {("pin",), ("password",), ("login",), ("bank", "details"), ("security", "code")}
KEYWORDS = set("stop yes win claim go prize".split())  # "text yes to ..."
WEEKDAYS = set("monday tuesday wednesday thursday friday saturday sunday".split())
# Time words. "moved to" and "before" need a point in time: "before friday", never "before soon".
POINTS_IN_TIME = WEEKDAYS | {"today", "tonight", "tomorrow"}
TIMES = POINTS_IN_TIME | {"soon", "later"}
CURRENCIES = {"pounds": "pl", "euros": "pl", "dollars": "pl",
              "pound": "sg", "euro": "sg", "dollar": "sg"}

UNITS = {w: i + 1 for i, w in enumerate("one two three four five six seven eight nine".split())}
TEENS = {w: i + 10 for i, w in enumerate(
    "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
TENS = {w: (i + 2) * 10 for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split())}
SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
DIGITS = {"zero", *UNITS}                    # the words a phone number is read out with
NUMBER_WORDS = set(UNITS) | set(TEENS) | set(TENS) | set(SCALES) | {"zero"}

# Everything else: function words, verbs and the fixed words of the message patterns.
FUNCTION_WORDS = set("""
    the a an my your our their his her its this that every some no
    i you we me it they he she him them us who which what when where whereas
    is are was were be been being have has had will would could can do does did not
    and but or so to at of on in for from with about before after by as than
    said expected agree disagree better
    left moved won got saying scam fake reply called owe still broken again ready repair free
    there special offer short check call tell see let know please rush
    best part day love thanks cheers talk later soon
    congratulations urgent locked winner dear customer customers tried reach refund order
    waiting limited half price final notice close sent pending payment found way earn week
    home parcel delivered text link confirm pay fee open enter get this claim now first
    prize school today tonight tomorrow bank details security code cash gift new electric
    tickets hi hey hello yes stop win go
""".split())

PUNCTUATION = {".", ",", "!", "?", ":"}
TERMINALS = {".", "!", "?"}
NOUNS = {**THINGS, **DOCUMENTS, **REVIEW_NOUNS}   # nouns whose number the surface rules need
for _words in (PLACES, EVENTS, ACCOUNTS, {"prize", "card", "car", "bike", "voucher", "cruise",
               "holiday", "iphone", "scooter", "television", "offer", "payment", "way", "week",
               "text", "scam", "winner", "customer", "refund", "order", "parcel", "link",
               "fee", "notice", "message", "code", "pin", "password", "login", "day", "part",
               "price", "school", "repair", "gift", "hour", "university"}):
    for _word in _words:
        NOUNS.setdefault(_word, Noun("sg"))
for _word in ("customers", "details", "tickets"):
    NOUNS.setdefault(_word, Noun("pl"))
for _word, _number in CURRENCIES.items():
    NOUNS.setdefault(_word, Noun(_number))
# Words that may stand between "a" and its noun ("a new car", "a gift card").
NOUN_MODIFIERS = set("new electric special pending cash gift security bank free big small "
                     "good great".split())

LEXICON = (set(NOUNS) | set(POLARITY) | INTENSIFIERS | set(FEELINGS) | set(RELATIVE_VERB_ASPECTS)
           | NAMES | PLACES | EVENTS | EVENT_ADJECTIVES | ACCOUNTS | KEYWORDS | TIMES
           | set(CURRENCIES) | NUMBER_WORDS | FUNCTION_WORDS | NOUN_MODIFIERS
           | {w for phrase in PRIZES | SECRETS for w in phrase})


def vowel_sound(word: str) -> bool:
    """Does ``word`` start with a vowel *sound* (so it takes "an")? English spelling decides
    most words; the exceptions are a "y"/"w" sound written with a vowel letter (university,
    euro, one) and a silent h (hour, honest)."""
    if word in ("hour", "hours", "honest", "honour", "heir", "herb"):
        return True
    if word.startswith(("uni", "use", "usu", "uti", "eu", "ewe", "one", "once", "ufo", "ubi")):
        return word.startswith(("unint", "uninv", "unimp"))   # un-in...: "an uninvited guest"
    return word[0] in "aeiou"


# ---------------------------------------------------------------------------------------------
# 2. Tokens and surface rules (they hold for every genre).
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z]+|[.,!?:]")


def tokens(text: str) -> list[str]:
    """The tokens of ``text``; raises unless they are lowercase words and punctuation marks
    separated by single spaces, and every word is in the lexicon."""
    if not text:
        raise LanguageError("tokens", text, "empty text")
    toks = text.split(" ")
    bad = [t for t in toks if not _TOKEN.fullmatch(t)]
    if bad:
        raise LanguageError("tokens", text, f"not a lowercase word or a punctuation token "
                            f"(or not single-spaced): {bad[:3]}")
    unknown = sorted({t for t in toks if t not in PUNCTUATION and t not in LEXICON})
    if unknown:
        raise LanguageError("lexicon", text, f"unknown words {unknown}: add each to the "
                            "checker's lexicon with its features once you have judged it")
    return toks


def _number_run(toks, start):
    """End of the run of number words starting at ``start`` ("a" counts before a scale)."""
    end = start
    while end < len(toks) and (toks[end] in NUMBER_WORDS
                               or (toks[end] == "a" and end + 1 < len(toks)
                                   and toks[end + 1] in SCALES)):
        end += 1
    return end


def cardinal(words) -> int | None:
    """The value of number words read as an amount ("fifty", "a hundred", "twenty five",
    "two thousand"), or None if they do not form one."""
    words = list(words)
    scale = 1
    if len(words) >= 2 and words[-1] in SCALES:
        scale, words = SCALES[words[-1]], words[:-1]
        if words == ["a"]:
            return scale
        if len(words) != 1 or words[0] not in UNITS | TEENS | TENS:
            return None
    if len(words) == 1:
        value = {**UNITS, **TEENS, **TENS}.get(words[0])
        return None if value is None else value * scale
    if len(words) == 2 and words[0] in TENS and words[1] in UNITS and scale == 1:
        return TENS[words[0]] + UNITS[words[1]]
    return None


def check_surface(toks: list[str], text: str) -> set[int]:
    """Rules that need no parse: terminal mark, punctuation, repeats, articles, numbers,
    "every". Returns the positions that belong to phone numbers (digits read out one by one)."""
    if toks[-1] not in TERMINALS:
        raise LanguageError("punctuation", text, "the text does not end with . ! or ?")
    if toks[0] in PUNCTUATION:
        raise LanguageError("punctuation", text, f"starts with {toks[0]!r}")
    phone = set()
    i = 0 if not NUMBER_WORDS.isdisjoint(toks) else len(toks)
    while i < len(toks):                     # numbers: a phone number or an amount + a noun
        if toks[i] == "a" and i + 1 < len(toks) and toks[i + 1] in NUMBER_WORDS \
                and toks[i + 1] not in SCALES:
            raise LanguageError("number", text, f"'a {toks[i + 1]}': only a scale takes the "
                                "article ('a hundred', 'a thousand')")
        if toks[i] in NUMBER_WORDS or (toks[i] == "a" and i + 1 < len(toks)
                                       and toks[i + 1] in SCALES):
            end = _number_run(toks, i)
            run = toks[i:end]
            if len(run) >= 3 and all(t in DIGITS for t in run):
                phone.update(range(i, end))
            else:
                value = cardinal(run)
                if value is None:
                    raise LanguageError("number", text, f"{' '.join(run)!r} is not a number "
                                        "(a scale needs 'a' or a multiplier: 'a thousand')")
                noun = NOUNS.get(toks[end]) if end < len(toks) else None
                if noun is None:
                    raise LanguageError("number", text, f"{' '.join(run)!r} is not followed "
                                        "by a noun")
                if noun.number != ("sg" if value == 1 else "pl"):
                    raise LanguageError("agreement", text, f"'{' '.join(run)} {toks[end]}': "
                                        "the noun's number does not match the amount")
            i = end
            continue
        i += 1
    for i, (left, right) in enumerate(zip(toks, toks[1:])):
        if left in PUNCTUATION and right in PUNCTUATION:
            raise LanguageError("punctuation", text, f"doubled punctuation {left!r} {right!r}")
        if left == right and not (i in phone and i + 1 in phone):
            raise LanguageError("repeat", text, f"the word {left!r} twice in a row")
        if left in ("a", "an"):
            if (left == "an") != vowel_sound(right):
                raise LanguageError("article", text, f"'{left} {right}': use "
                                    f"{'an' if vowel_sound(right) else 'a'} before {right!r}")
            if right in SCALES:
                continue
            head = i + 1             # skip modifiers to the head noun: a [new] car, a [gift] card
            while head + 1 < len(toks) and toks[head] in NOUN_MODIFIERS and (
                    toks[head + 1] in NOUNS or toks[head + 1] in NOUN_MODIFIERS):
                head += 1
            noun = NOUNS.get(toks[head]) if head < len(toks) else None
            if noun is None or noun.number != "sg":
                raise LanguageError("article", text, f"'{left} {' '.join(toks[i + 1:head + 1])}'"
                                    ": a/an needs a singular noun")
        if left == "every" and NOUNS.get(right, Noun("sg")).number != "sg":
            raise LanguageError("agreement", text, f"'every {right}': every takes a singular")
    return phone


def sentences(toks: list[str]) -> list[list[str]]:
    """Split tokens after each terminal mark (the mark stays with its sentence)."""
    out, start = [], 0
    for i, tok in enumerate(toks):
        if tok in TERMINALS:
            out.append(toks[start:i + 1])
            start = i + 1
    return out


# ---------------------------------------------------------------------------------------------
# 3. What a reading returns.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clause:
    """One judgement in a review: the aspect, the clause's form, praised or not, the noun."""
    aspect: str
    form: str
    praised: bool
    noun: str


@dataclass(frozen=True)
class Reading:
    genre: str            # "review" or "message"
    meaning: tuple        # review: ((aspect, praised), ...); message: (("spam", bool),)
    composition: tuple    # review: ((aspect, form), ...); message: (first part, second part)
    clauses: tuple = ()   # review only
    spam_reason: str = ""  # message only: what makes it spam, "" for ham


# ---------------------------------------------------------------------------------------------
# 4. Reviews. The clause grammar, written as recursive descent (each rule is one function):
#
#   sentence     := reported "." | expected "." | clause ("," CONJ clause)* "."
#   CONJ         := "and" | "but" | "whereas"   ("and" joins like verdicts, the others unlike)
#   clause       := feeling | NP could | NP copular | NP "," REL NAME RELVERB "," copular
#   NP           := "the" NOUN
#   copular      := BE ["not"] [INTENSIFIER] ADJ            -> form "plain" / "negated"
#   could        := "could" ["not"] "have" "been" "better"  -> form "could"
#   feeling      := "i" FEELING NP                          -> form "feeling"
#   relative     := NP "," REL NAME RELVERB "," copular     -> form "relative"
#   reported     := NAME "said" NP copular "," ("and i agree" | "but i disagree")
#   expected     := "i expected" NP "to be" [INTENSIFIER] ADJ ","
#                   ("and" | "but") ANAPHOR BE [["not"] [INTENSIFIER] ADJ]
#
# A verdict is a bool: True praises. "not" flips an adjective; "could have been better"
# criticises and "could not have been better" praises; "but i disagree" flips what was
# reported; "i expected X to be A , but it was B" judges by B, and "..., and it was ." by A.
# ---------------------------------------------------------------------------------------------

class _Cursor:
    """Tokens of one sentence (its terminal mark removed) and a position in them."""

    def __init__(self, toks, text):
        self.toks, self.text, self.i = toks, text, 0

    def peek(self, ahead=0):
        j = self.i + ahead
        return self.toks[j] if j < len(self.toks) else None

    def take(self, allowed, what):
        tok = self.peek()
        if tok is None or tok not in allowed:
            raise self.error(f"expected {what} at {' '.join(self.toks[:self.i])} ^ "
                             f"{' '.join(self.toks[self.i:])}")
        self.i += 1
        return tok

    def accept(self, word):
        if self.peek() == word:
            self.i += 1
            return True
        return False

    def done(self):
        return self.i == len(self.toks)

    def error(self, detail, rule="parse"):
        return LanguageError(rule, self.text, detail)


def _noun_phrase(cur):
    """NP := "the" NOUN (a review noun)."""
    cur.take({"the"}, "'the'")
    word = cur.take(REVIEW_NOUNS, "a noun of the evening")
    return word, REVIEW_NOUNS[word]


def _be_agreeing(cur, subject, number):
    """Past-tense BE agreeing with its subject: the soup was, the dishes were, they were."""
    verb = cur.take({"was", "were"}, "'was' or 'were'")
    if verb != ("was" if number == "sg" else "were"):
        raise cur.error(f"'{subject} {verb}': {subject!r} is "
                        f"{'singular' if number == 'sg' else 'plural'}", "agreement")
    return verb


def _adjective(cur, aspect):
    """[INTENSIFIER] ADJ -> the adjective's polarity; checks that the adjective fits the aspect."""
    if cur.peek() in INTENSIFIERS:
        cur.i += 1
    adjective = cur.take(POLARITY, "a judging adjective")
    if aspect not in ADJECTIVE_ASPECTS.get(adjective, ASPECTS):
        raise cur.error(f"{adjective!r} does not fit the {aspect}", "meaning")
    return POLARITY[adjective]


def _copular(cur, word, noun):
    """BE ["not"] [INTENSIFIER] ADJ -> (form, verdict)."""
    _be_agreeing(cur, f"the {word}", noun.number)
    negated = cur.accept("not")
    return ("negated" if negated else "plain"), _adjective(cur, noun.aspect) != negated


def _clause(cur):
    """One clause of a coordination: feeling, could, copular or relative."""
    if cur.peek() == "i":
        cur.i += 1
        feeling = cur.take(FEELINGS, "a verb of feeling (loved, hated, ...)")
        word, noun = _noun_phrase(cur)
        return Clause(noun.aspect, "feeling", FEELINGS[feeling], word)
    word, noun = _noun_phrase(cur)
    if cur.accept("could"):
        negated = cur.accept("not")
        for expected in ("have", "been", "better"):
            cur.take({expected}, repr(expected))
        return Clause(noun.aspect, "could", negated, word)
    if cur.accept(","):
        pronoun = cur.take({"who", "which"}, "'who' or 'which'")
        if not noun.collective and (pronoun == "who") != noun.person:
            raise cur.error(f"'the {word} , {pronoun}': use "
                            f"{'who' if noun.person else 'which'} for the {word}", "agreement")
        cur.take(NAMES, "a name")
        verb = cur.take(RELATIVE_VERB_ASPECTS, "a verb (recommended, ordered, ...)")
        if noun.aspect not in RELATIVE_VERB_ASPECTS[verb]:
            raise cur.error(f"'{verb}' does not fit the {word}", "meaning")
        cur.take({","}, "',' closing the relative clause")
        _, praised = _copular(cur, word, noun)
        return Clause(noun.aspect, "relative", praised, word)
    form, praised = _copular(cur, word, noun)
    return Clause(noun.aspect, form, praised, word)


def _reported(cur):
    """NAME "said" NP copular "," ("and i agree" | "but i disagree")."""
    cur.take(NAMES, "a name")
    cur.take({"said"}, "'said'")
    word, noun = _noun_phrase(cur)
    _, claimed = _copular(cur, word, noun)
    cur.take({","}, "','")
    conjunction = cur.take({"and", "but"}, "'and' or 'but'")
    cur.take({"i"}, "'i'")
    cur.take({"agree"} if conjunction == "and" else {"disagree"},
             "'and i agree' or 'but i disagree'")
    return Clause(noun.aspect, "reported", claimed if conjunction == "and" else not claimed, word)


PRONOUN_NUMBER = {"it": "sg", "he": "sg", "she": "sg", "they": "pl"}


def _anaphor(cur, word, noun):
    """The subject that refers back to the expected noun: a pronoun of the right number and
    kind (it / they; a person is never "it"), or the same noun repeated. Returns the subject
    and the number its verb must agree with."""
    if cur.accept("the"):
        again = cur.take(REVIEW_NOUNS, "the noun again")
        if again != word:
            raise cur.error(f"'the {again}' refers back to 'the {word}'", "reference")
        return f"the {word}", noun.number
    pronoun = cur.take(PRONOUN_NUMBER, "a pronoun or the noun again")
    fits = {"it": noun.number == "sg" and not noun.person,
            "they": noun.number == "pl",
            "he": noun.number == "sg" and noun.person and not noun.collective,
            "she": noun.number == "sg" and noun.person and not noun.collective}[pronoun]
    if not fits:
        raise cur.error(f"{pronoun!r} cannot refer back to 'the {word}'", "reference")
    return pronoun, PRONOUN_NUMBER[pronoun]


def _expected(cur):
    """"i expected" NP "to be" ADJ "," CONJ ANAPHOR BE [["not"] ADJ]."""
    cur.take({"i"}, "'i'")
    cur.take({"expected"}, "'expected'")
    word, noun = _noun_phrase(cur)
    cur.take({"to"}, "'to'")
    cur.take({"be"}, "'be'")
    expectation = _adjective(cur, noun.aspect)
    cur.take({","}, "','")
    conjunction = cur.take({"and", "but"}, "'and' or 'but'")
    _be_agreeing(cur, *_anaphor(cur, word, noun))
    if cur.done():                                    # "..., and it was ." (as expected)
        if conjunction != "and":
            raise cur.error("'but it was .' leaves out what it was", "parse")
        return Clause(noun.aspect, "expected", expectation, word)
    negated = cur.accept("not")
    if cur.done():                                    # "..., but it was not ."
        outcome = not expectation
    else:
        outcome = _adjective(cur, noun.aspect) != negated
    if (conjunction == "but") != (outcome != expectation):
        raise cur.error(f"'{conjunction}' joins an expectation and an outcome that "
                        f"{'agree' if outcome == expectation else 'differ'}", "coherence")
    return Clause(noun.aspect, "expected", outcome, word)


def review_sentence(toks: list[str], text: str) -> list[Clause]:
    """The clauses of one review sentence (tokens include the final ".")."""
    if toks[-1] != ".":
        raise LanguageError("punctuation", text, f"a review sentence ends with '.', "
                            f"not {toks[-1]!r}")
    cur = _Cursor(toks[:-1], text)
    if cur.peek(1) == "said":
        clauses = [_reported(cur)]
    elif cur.peek() == "i" and cur.peek(1) == "expected":
        clauses = [_expected(cur)]
    else:
        clauses = [_clause(cur)]
        while cur.accept(","):
            conjunction = cur.take({"and", "but", "whereas"}, "'and', 'but' or 'whereas'")
            clauses.append(_clause(cur))
            same = clauses[-2].praised == clauses[-1].praised
            if same != (conjunction == "and"):     # "and" joins like verdicts, "but" unlike
                raise cur.error(f"'{conjunction}' joins verdicts that "
                                f"{'agree' if same else 'differ'}", "coherence")
    if not cur.done():
        raise cur.error(f"unexpected {' '.join(cur.toks[cur.i:])!r} at the end of a clause")
    return clauses


def read_review(text: str, toks: list[str] | None = None) -> Reading:
    """Parse a review of one or more sentences; each aspect is judged once."""
    toks = toks if toks is not None else tokens(text)
    clauses = [c for sent in sentences(toks) for c in review_sentence(sent, text)]
    aspects = [c.aspect for c in clauses]
    if len(set(aspects)) != len(aspects):
        raise LanguageError("meaning", text, f"an aspect is judged twice: {aspects}")
    return Reading("review", tuple((c.aspect, c.praised) for c in clauses),
                   tuple((c.aspect, c.form) for c in clauses), tuple(clauses))


# ---------------------------------------------------------------------------------------------
# 5. Messages. A message is [greeting] FIRST SECOND [closing]: a piece of news (or a hook) and
#    then a request (or a call to action). The parts are patterns written from samples; UPPER
#    words are slots of section 5a, lower words and marks must appear as written.
# ---------------------------------------------------------------------------------------------

FIRST_PARTS = {   # news between friends, then the hooks of scams
    "left": "i left my THING at PLACE .",
    "moved": "the EVENT IS moved to POINT .",
    "school prize": "NAME won a prize at school today .",
    "free food": "there is free food at PLACE TIME .",
    "scam text": "i got a text saying i won PRIZE , it is a scam .",
    "bank called": "the bank called about my ACCOUNT .",
    "owe": "we still owe NAME AMOUNT for the tickets .",
    "broken": "my THING IS broken again .",
    "said": "NAME said the EVENT WAS EVENTADJ .",
    "coffee offer": "PLACE HAS a special offer on coffee TIME .",
    "repaired": "your THING IS ready at PLACE , the repair was free .",
    "will be": "i will be at PLACE TIME .",
    "in short": "in short , the EVENT WAS EVENTADJ .",
    "fake": "do not reply to that message about PRIZE , it is fake .",
    "won": "congratulations ! you have won PRIZE .",
    "locked": "urgent : your ACCOUNT IS locked .",
    "winner": "you are a winner !",
    "refund": "dear customer , we tried to reach you about your refund of AMOUNT .",
    "order": "your THING order is waiting .",
    "half price": "limited offer : half price on every THING TIME .",
    "closing": "final notice : your ACCOUNT will close TIME .",
    "sent": "NAME sent you PRIZE !",
    "payment": "your ACCOUNT HAS a pending payment of AMOUNT .",
    "earn": "i found a way to earn AMOUNT a week from home .",
    "parcel": "your parcel could not be delivered .",
    "free when": "are you free TIME ?",
    "free prize": "free BAREPRIZE for the first AMOUNT !",
}
SECOND_PARTS = {  # requests between friends, then the calls to action of scams
    "check": "can you check TIME ?",
    "call me": "call me when you can .",
    "no rush": "reply when you can , no rush .",
    "tell": "please tell NAME .",
    "see you": "see you at PLACE .",
    "let me know": "let me know TIME .",
    "free when": "are you free TIME ?",
    "best part": "what was the best part of your day ?",
    "call to claim": "call PHONE now to claim it .",
    "call now": "call PHONE now .",
    "reply with": "reply with your SECRET TIME .",
    "text keyword": "text KEYWORD to PHONE .",
    "confirm": "confirm your SECRET at the link .",
    "pay fee": "pay the fee of AMOUNT at the link .",
    "reply keyword": "reply KEYWORD before POINT .",
    "open link": "open the link and enter your SECRET .",
    "call when": "call PHONE when you get this .",
}
GREETINGS = {"hi", "hey", "hello"}
CLOSINGS = [c.split() for c in ("see you soon .", "talk later .", "love you !", "thanks !",
                                "cheers !")]


# 5a. Slots: each returns the (end, noun) pairs it can span from ``i`` (noun: the Noun whose
#     number a following IS/WAS/HAS must agree with, or None).

def _phrase_slot(phrases):
    def match(toks, i):
        return [(i + len(p), NOUNS.get(p[-1])) for p in phrases if tuple(toks[i:i + len(p)]) == p]
    return match


def _word_slot(words, noun=None):
    def match(toks, i):
        return [(i + 1, noun)] if i < len(toks) and toks[i] in words else []
    return match


def _place(toks, i):      # "the cafe"
    return [(i + 2, Noun("sg"))] if toks[i:i + 1] == ["the"] and i + 1 < len(toks) \
        and toks[i + 1] in PLACES else []


def _thing(toks, i):
    return [(i + 1, THINGS[toks[i]])] if i < len(toks) and toks[i] in THINGS else []


def _prize(toks, i):      # "a voucher", "an electric bike" (the article is checked in 2.)
    if i < len(toks) and toks[i] in ("a", "an"):
        return _phrase_slot(PRIZES)(toks, i + 1)
    return []


def _amount(toks, i):     # "fifty pounds", "a hundred euros", "fifty customers"
    end = _number_run(toks, i)
    if end > i and cardinal(toks[i:end]) is not None and end < len(toks) \
            and (toks[end] in CURRENCIES or toks[end] == "customers"):
        return [(end + 1, None)]
    return []


def _phone(toks, i):      # a phone number read out digit by digit
    end = i
    while end < len(toks) and toks[end] in DIGITS:
        end += 1
    return [(end, None)] if end - i >= 3 else []


def _agreeing(present, plural):
    """IS / WAS / HAS: the verb must agree with the last noun slot before it."""
    def match(toks, i, last_noun, text):
        if i >= len(toks) or toks[i] not in (present, plural):
            return False
        if last_noun is not None and toks[i] != (present if last_noun.number == "sg" else plural):
            raise LanguageError("agreement", text, f"{toks[i]!r} after a "
                                f"{'singular' if last_noun.number == 'sg' else 'plural'} noun "
                                f"in {' '.join(toks[max(0, i - 3):i + 1])!r}")
        return True
    return match


SLOTS = {
    "THING": _thing, "PLACE": _place, "PRIZE": _prize, "AMOUNT": _amount, "PHONE": _phone,
    "BAREPRIZE": _phrase_slot(PRIZES), "SECRET": _phrase_slot(SECRETS),
    "NAME": _word_slot(NAMES), "EVENT": _word_slot(EVENTS, Noun("sg")),
    "ACCOUNT": _word_slot(ACCOUNTS, Noun("sg")), "TIME": _word_slot(TIMES),
    "POINT": _word_slot(POINTS_IN_TIME), "EVENTADJ": _word_slot(EVENT_ADJECTIVES),
    "KEYWORD": _word_slot(KEYWORDS),
}
AGREEING = {"IS": _agreeing("is", "are"), "WAS": _agreeing("was", "were"),
            "HAS": _agreeing("has", "have")}
# The words each slot can start with, to try only the patterns that can match at a position.
SLOT_FIRST_WORDS = {"NAME": NAMES, "PLACE": {"the"}, "PRIZE": {"a", "an"}, "THING": set(THINGS)}


def _by_first_word(patterns):
    index = {}
    for name, pattern in patterns.items():
        words = pattern.split()
        for first in SLOT_FIRST_WORDS.get(words[0], {words[0]}):
            index.setdefault(first, []).append((name, words))
    return index


_FIRST = _by_first_word(FIRST_PARTS)
_SECOND = _by_first_word(SECOND_PARTS)


def _match(pattern, toks, i, text, k=0, last_noun=None):
    """Every end position at which ``pattern[k:]`` matches ``toks`` from ``i``."""
    if k == len(pattern):
        return [i]
    symbol = pattern[k]
    if symbol in SLOTS:
        return [end for j, noun in SLOTS[symbol](toks, i)
                for end in _match(pattern, toks, j, text, k + 1, noun or last_noun)]
    if symbol in AGREEING:
        ok = AGREEING[symbol](toks, i, last_noun, text)
        return _match(pattern, toks, i + 1, text, k + 1, None) if ok else []
    if i < len(toks) and toks[i] == symbol:
        return _match(pattern, toks, i + 1, text, k + 1, last_noun)
    return []


def _parts(patterns, toks, i, text):
    """(name, end) for every pattern of ``patterns`` (indexed by first word) matching at ``i``."""
    if i >= len(toks):
        return []
    return [(name, end) for name, pattern in patterns.get(toks[i], ())
            for end in _match(pattern, toks, i, text)]


def message_parses(toks: list[str], i: int, text: str):
    """(first part, second part, end) for every way a message can start at ``i``."""
    if i >= len(toks):
        return []
    start = i
    if toks[i] in GREETINGS:
        if not (i + 2 < len(toks) and toks[i + 1] in NAMES and toks[i + 2] == ","):
            return []
        start = i + 3
    out = []
    for first, mid in _parts(_FIRST, toks, start, text):
        for second, end in _parts(_SECOND, toks, mid, text):
            out.append((first, second, end, start != i))
            for closing in CLOSINGS:
                if toks[end:end + len(closing)] == closing:
                    out.append((first, second, end + len(closing), start != i))
    return out


# 5b. Reference across the parts. "it" needs something to refer to: "call ... now to claim it"
#     must follow a prize, a refund, an order, a parcel, an offer or a payment, not "your
#     account is locked" or "are you free today ?". And a message addresses its reader once:
#     "hi sam , dear customer , ..." greets a friend by name and then a stranger.
CLAIMABLE = {"won", "winner", "refund", "order", "sent", "parcel", "free prize", "half price",
             "payment"}
ADDRESSES_READER = {"refund"}   # opens with "dear customer ,"


def check_message_reference(first: str, second: str, greeted: bool, text: str):
    if second == "call to claim" and first not in CLAIMABLE:
        raise LanguageError("reference", text, "'claim it': nothing before it can be claimed "
                            f"(the message opens with the {first!r} part)")
    if greeted and first in ADDRESSES_READER:
        raise LanguageError("reference", text, "the message greets a friend by name and then "
                            "says 'dear customer'")


# ---------------------------------------------------------------------------------------------
# 6. What makes a message spam. A friend asks you to call *them*, to reply when you can, to
#    check or tell something. A scammer asks you to act through a channel they control (call
#    or text a phone number, reply with a keyword, open or visit "the link"), to give away a
#    secret (a pin, a password, a login, bank details, a security code) or to pay a fee.
#    Mentioning a prize or a scam is not spam; a request that is negated ("do not reply") is
#    not a request. Judged from the words of each imperative sentence, not from pattern names.
# ---------------------------------------------------------------------------------------------

IMPERATIVES = set("call text reply confirm pay open enter send visit click tell let see".split())
SECRET_WORDS = {"pin", "password", "login", "details", "code"}


def spam_reason(toks: list[str]) -> str:
    """Why the message is spam ("" if it is not): the first stranger-controlled request."""
    for sent in sentences(toks):
        if sent[0] in GREETINGS and len(sent) > 3 and sent[2] == ",":
            sent = sent[3:]
        if sent[:1] == ["please"]:
            sent = sent[1:]
        if not sent or sent[0] not in IMPERATIVES:      # statements, questions, "do not ..."
            continue
        if sum(t in DIGITS for t in sent) >= 3:
            return f"asks to {sent[0]} a phone number"
        if "link" in sent:
            return "asks to open a link"
        if sent[0] in ("reply", "text") and len(sent) > 1 and sent[1] in KEYWORDS:
            return f"asks to {sent[0]} the keyword {sent[1]!r}"
        if any(t in SECRET_WORDS for t in sent):
            return "asks for a secret"
        if sent[0] == "pay" or "fee" in sent:
            return "asks to pay"
    return ""


def read_message(text: str, toks: list[str] | None = None, references: bool = True) -> Reading:
    """Parse one message and decide whether it is spam (``references=False`` skips 5b)."""
    toks = toks if toks is not None else tokens(text)
    parses = {(a, b, greeted) for a, b, end, greeted in message_parses(toks, 0, text)
              if end == len(toks)}
    if not parses:
        raise LanguageError("parse", text, "not a message: no greeting + news/hook + "
                            "request/action + closing reading covers it")
    if len(parses) > 1:
        raise LanguageError("parse", text, f"ambiguous message: {sorted(parses)}")
    first, second, greeted = parses.pop()
    if references:
        check_message_reference(first, second, greeted, text)
    reason = spam_reason(toks)
    return Reading("message", (("spam", bool(reason)),), (first, second), spam_reason=reason)


# ---------------------------------------------------------------------------------------------
# 7. Any text, and pretraining documents (one to three texts written one after another).
# ---------------------------------------------------------------------------------------------

def _looks_like_review(toks):
    """Reviews start with "the NOUN was/were/could/,", "i" + a verb of feeling or "expected",
    or "NAME said the NOUN"; no message does ("the garden has a special offer" is news)."""
    return (toks[0] == "the" and len(toks) > 2 and toks[1] in REVIEW_NOUNS
            and toks[2] in ("was", "were", "could", ",")) or (
        toks[0] == "i" and len(toks) > 1 and (toks[1] in FEELINGS or toks[1] == "expected")) or (
        toks[0] in NAMES and toks[1:3] == ["said", "the"] and len(toks) > 3
        and toks[3] in REVIEW_NOUNS)


def read(text: str, references: bool = True) -> Reading:
    """Check and read one generated text (a review or a message). ``references=False`` skips
    the checks of 5b, to reconstruct a composition even when one of them fails."""
    toks = tokens(text)
    check_surface(toks, text)
    if _looks_like_review(toks):
        return read_review(text, toks)
    return read_message(text, toks, references)


def read_document(text: str, references: bool = True) -> list[tuple[str, tuple]]:
    """Check a pretraining document and split it into its pieces: ("review sentence",
    clauses) for each review sentence and ("message", (first, second)) for each message.
    Review sentences are not grouped into reviews: where one review ends and the next
    begins is not written in the text. ``references=False`` skips the checks of 5b."""
    toks = tokens(text)
    check_surface(toks, text)
    # Dynamic programming over token positions: reach[i] = how the document up to i was read.
    reach = {0: None}
    for i in range(len(toks)):
        if i not in reach:
            continue
        if _looks_like_review(toks[i:i + 4]) and "." in toks[i:]:
            end = toks.index(".", i) + 1
            reach.setdefault(end, (i, "review sentence", tuple(review_sentence(toks[i:end], text))))
        for first, second, end, greeted in message_parses(toks, i, text):
            reach.setdefault(end, (i, "message", (first, second, greeted)))
    if len(toks) not in reach:
        done = max(reach)
        raise LanguageError("parse", text, f"cannot read the document past "
                            f"{' '.join(toks[max(0, done - 6):done])!r} ^ "
                            f"{' '.join(toks[done:done + 8])!r}")
    pieces, end = [], len(toks)
    while end:
        start, kind, value = reach[end]
        pieces.append((kind, value))
        end = start
    for kind, value in pieces:
        if kind == "message" and references:
            check_message_reference(*value, text)
    return [(kind, value[:2] if kind == "message" else value) for kind, value in pieces[::-1]]


# ---------------------------------------------------------------------------------------------
# 8. Style notes: not errors of grammar or meaning, but worth a look (reported, not asserted).
# ---------------------------------------------------------------------------------------------

def style_notes(text: str) -> list[str]:
    """Awkward but grammatical things in a text."""
    notes = []
    for sent in sentences(text.split(" ")):
        contrasts = [t for t in sent if t in ("but", "whereas")]
        if len(contrasts) >= 2 and "disagree" not in sent:
            notes.append("two contrasts in one sentence ('" + "' ... '".join(contrasts) + "')")
    if re.search(r"\b(keys|tickets|gloves|shoes|books) order\b", text):
        notes.append("a regular plural used as a noun modifier ('keys order')")
    return notes


# ---------------------------------------------------------------------------------------------
# 9. Leaks: does a text occur in a corpus as a run of whole sentences?
# ---------------------------------------------------------------------------------------------

def sentence_strings(text: str) -> tuple[str, ...]:
    """The sentences of a text, each as a string ending with its terminal mark."""
    return tuple(" ".join(sent) for sent in sentences(text.split(" ")))


class SentenceIndex:
    """Finds a text inside a corpus of documents when it occurs there as a run of whole
    sentences: "the soup was great ." is found in "i hated the tea . the soup was great .",
    not in "the soup was great , and the tea was nice .". A whole document is such a run."""

    def __init__(self, documents):
        self.documents = [sentence_strings(doc) for doc in documents]
        self.starts = {}            # sentence -> [(document, position), ...]
        for d, sents in enumerate(self.documents):
            for k, sent in enumerate(sents):
                self.starts.setdefault(sent, []).append((d, k))

    def find(self, text: str) -> int | None:
        """The index of the first document that holds ``text``, or None."""
        sents = sentence_strings(text)
        for d, k in self.starts.get(sents[0], ()):
            if self.documents[d][k:k + len(sents)] == sents:
                return d
        return None

"""The generated language, read back by an independent checker (``tests/language_checker.py``).

The checker has its own lexicon, phrase grammar and semantics, written without the generator's
rules, so these tests hold ``lora_course.language`` against a second implementation (issue 8,
"a clean language" and "no leaks"):

- 10,000 texts of each kind the generator writes (main-task reviews, free reviews, ham, spam),
  every text of the "aspect" and "spam" splits and every pretraining document read back:
  tokens, surface rules, parse, agreement, reference, and the meaning the generator claims
  (``Sentence.meaning``, ``data.label_of``, the split labels) equal to the meaning read;
- no validation or test text in the pretraining corpus or the training split, and validation and
  test compositions (reconstructed by the checker's parser) absent from training;
- the checker itself rejects hand-written broken text, so a pass means something.

A failure lists, per rule, how many texts break it and the first few of them.
"""
import collections
import random

import pytest
import torch

import language_checker as checker
from lora_course import data, language

SAMPLES = 10_000   # per kind of generated text
SHOWN = 5          # offending texts shown per rule in a failure message


def _report(failures, checked):
    """A failure message: the count per rule, then the first offending texts of each."""
    total = sum(len(texts) for texts in failures.values())
    lines = [f"{total} of {checked} texts break a rule:"]
    for rule, problems in sorted(failures.items(), key=lambda item: -len(item[1])):
        lines.append(f"  {rule}: {len(problems)}")
        kinds = collections.Counter(problem.split("\n")[0] for problem in problems)
        if len(kinds) <= 12:    # few distinct details: count each
            lines += [f"    {n} x {detail}" for detail, n in kinds.most_common()]
        lines += [f"    {problem}" for problem in problems[:SHOWN]]
    return "\n".join(lines)


def _praised_class(meaning):
    """The aspect-task class of a review meaning: the one praised aspect (None if not one)."""
    praised = [aspect for aspect, good in meaning if good]
    return data.TASKS["aspect"].index(praised[0]) if len(praised) == 1 else None


def _spam_class(meaning):
    return data.TASKS["spam"].index("spam" if dict(meaning)["spam"] else "ham")


def read(text):
    """(reading, error). A text that breaks a rule gives its error, and, where only a
    reference check of section 5b failed, the reading without those checks (so that its
    composition can still be compared); otherwise the reading is None."""
    try:
        return checker.read(text), None
    except checker.LanguageError as error:
        try:
            return checker.read(text, references=False), error
        except checker.LanguageError:
            return None, error


def sentence_problems(sentence, kind, reading, error):
    """(rule, message) for everything wrong with one generated ``Sentence`` of ``kind``
    ("praise review", "any review", "ham" or "spam"); empty when it reads back as claimed."""
    if error is not None:
        return [(error.rule, str(error))]
    shown = f"{sentence.text!r}"
    problems = []
    if reading.meaning != sentence.meaning:
        problems.append(("meaning", f"reads as {reading.meaning}, generator says "
                                    f"{sentence.meaning}: {shown}"))
    if kind.endswith("review"):
        if reading.genre != "review":
            problems.append(("genre", f"a review that reads as a message: {shown}"))
        count = len(reading.meaning)
        if not (2 if kind == "praise review" else 1) <= count <= 3:
            problems.append(("meaning", f"{count} aspects judged: {shown}"))
        if kind == "praise review":
            mine = _praised_class(reading.meaning)
            if mine is None:
                problems.append(("label", f"not exactly one aspect praised: {shown}"))
            elif data.label_of("aspect", sentence) != mine:
                problems.append(("label", f"label_of gives "
                                 f"{data.TASKS['aspect'][data.label_of('aspect', sentence)]}, "
                                 f"the text praises {data.TASKS['aspect'][mine]}: {shown}"))
    else:
        is_spam = dict(reading.meaning).get("spam")
        if reading.genre != "message" or is_spam != (kind == "spam"):
            problems.append(("label", f"asked for {kind}, reads as "
                             f"{'spam (' + reading.spam_reason + ')' if is_spam else 'ham'}:"
                             f" {shown}"))
        elif data.label_of("spam", sentence) != _spam_class(reading.meaning):
            problems.append(("label", f"label_of disagrees with the text: {shown}"))
    return problems


def split_problems(text, label, task, reading, error):
    """(rule, message) if a split text does not read back with its label."""
    if error is not None:
        return [(error.rule, str(error))]
    mine = _praised_class(reading.meaning) if task == "aspect" else (
        _spam_class(reading.meaning) if reading.genre == "message" else None)
    if mine != label:
        return [("label", f"labelled {data.TASKS[task][label]}, the text says "
                          f"{data.TASKS[task][mine] if mine is not None else 'neither'}: "
                          f"{text!r}")]
    return []


def _group(problems):
    failures = collections.defaultdict(list)
    for rule, message in problems:
        failures[rule].append(message)
    return failures


# ---------------------------------------------------------------------------------------------
# Data and its readings, made once per module (the splits take a few seconds; each text is
# read once).
# ---------------------------------------------------------------------------------------------

KINDS = ("praise review", "any review", "ham", "spam")


@pytest.fixture(scope="module")
def samples():
    """{kind: [(Sentence, reading, error), ...]} for SAMPLES generated texts of each kind."""
    rng = random.Random(8)
    make = {"praise review": language.praise_review, "any review": language.any_review,
            "ham": lambda r: language.message(r, "ham"),
            "spam": lambda r: language.message(r, "spam")}
    out = {}
    for kind in KINDS:
        sentences = [make[kind](rng) for _ in range(SAMPLES)]
        out[kind] = [(sentence, *read(sentence.text)) for sentence in sentences]
    return out


@pytest.fixture(scope="module")
def splits():
    """{task: {split name: [(text, label, reading, error), ...]}}."""
    out = {}
    for task in data.TASKS:
        out[task] = {}
        for name, split in data.classification_splits(task).items():
            labels = split.labels.tolist() if isinstance(split.labels, torch.Tensor) \
                else list(split.labels)
            assert len(labels) == len(split.texts)
            out[task][name] = [(text, label, *read(text))
                               for text, label in zip(split.texts, labels)]
    return out


@pytest.fixture(scope="module")
def pretraining_index(pretraining):
    return checker.SentenceIndex(document for document, _, _ in pretraining)


@pytest.fixture(scope="module")
def pretraining():
    """[(document, pieces, error), ...]: pieces read without the 5b checks when only those
    failed (None when the document does not parse)."""
    out = []
    for document in data.pretraining_texts():
        try:
            out.append((document, checker.read_document(document), None))
        except checker.LanguageError as error:
            try:
                pieces = checker.read_document(document, references=False)
            except checker.LanguageError:
                pieces = None
            out.append((document, pieces, error))
    return out


# ---------------------------------------------------------------------------------------------
# 1-4. Generated text reads back: grammar, agreement, reference, meaning, labels.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_generated_text_reads_back_as_claimed(samples, kind):
    problems = [problem for sentence, reading, error in samples[kind]
                for problem in sentence_problems(sentence, kind, reading, error)]
    assert not problems, _report(_group(problems), len(samples[kind]))


@pytest.mark.parametrize("task", sorted(data.TASKS))
def test_split_texts_read_back_with_their_labels(splits, task):
    rows = [row for split in splits[task].values() for row in split]
    problems = [p for text, label, reading, error in rows
                for p in split_problems(text, label, task, reading, error)]
    assert not problems, _report(_group(problems), len(rows))


def test_pretraining_documents_read_back(pretraining):
    problems = [(error.rule, str(error)) for _, _, error in pretraining if error is not None]
    assert not problems, _report(_group(problems), len(pretraining))


def test_compositions_read_back_match_the_generators_skeletons(samples):
    """The checker's composition (aspect + clause form per clause; the two message parts) and
    the generator's skeleton determine each other: two independent abstractions of the same
    text agree, so disjointness tested with the checker's means disjointness of skeletons."""
    skeletons_of, compositions_of = collections.defaultdict(set), collections.defaultdict(set)
    for kind in KINDS:
        for sentence, reading, _ in samples[kind]:
            if reading is not None:          # unreadable texts fail the tests above
                skeletons_of[reading.composition].add(sentence.skeleton)
                compositions_of[sentence.skeleton].add(reading.composition)
    merged = {c: s for c, s in skeletons_of.items() if len(s) > 1}
    split = {s: c for s, c in compositions_of.items() if len(c) > 1}
    assert len(skeletons_of) > 1000, "too few compositions read to compare"
    assert not merged, f"one composition, several skeletons: {list(merged.items())[:3]}"
    assert not split, f"one skeleton, several compositions: {list(split.items())[:3]}"


def test_checker_lexicon_covers_the_generators_vocabulary():
    """Every word the generator can produce has been judged by the checker (features in its
    lexicon), including words too rare to turn up in the samples."""
    unknown = sorted(set(language.vocabulary()) - checker.LEXICON - checker.PUNCTUATION)
    assert not unknown, f"words the checker's lexicon does not know: {unknown}"


# ---------------------------------------------------------------------------------------------
# 5. No leaks.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(data.TASKS))
def test_no_held_out_text_in_pretraining_or_training(splits, pretraining, pretraining_index,
                                                    task):
    """No validation or test text is a pretraining document or a run of whole sentences in
    one, nor a training text; no text occurs twice across the splits."""
    documents = [document for document, _, _ in pretraining]
    corpus = pretraining_index
    train = {row[0] for row in splits[task]["train"]}
    leaks = []
    for name in ("val", "test"):
        for text, *_ in splits[task][name]:
            found = corpus.find(text)
            if found is not None:
                leaks.append(f"{name} text {text!r} is in pretraining document "
                             f"{documents[found]!r}")
            if text in train:
                leaks.append(f"{name} text {text!r} is a training text")
    every_text = [row[0] for split in splits[task].values() for row in split]
    repeated = [t for t, n in collections.Counter(every_text).items() if n > 1]
    assert not repeated, f"{len(repeated)} texts occur twice in the splits: {repeated[:SHOWN]}"
    assert not leaks, f"{len(leaks)} held-out texts leak:\n" + "\n".join(leaks[:SHOWN])


def _compositions(rows):
    unreadable = [text for text, _, reading, _ in rows if reading is None]
    assert not unreadable, f"cannot reconstruct the composition of {unreadable[:SHOWN]}"
    return {reading.composition for _, _, reading, _ in rows}


@pytest.mark.parametrize("task", sorted(data.TASKS))
def test_held_out_compositions_are_not_trained_on(splits, task):
    """Each validation and test text has a composition (read by the checker) that no training
    text has, and validation and test share none either."""
    compositions = {name: _compositions(rows) for name, rows in splits[task].items()}
    for held_out in ("val", "test"):
        shared = compositions[held_out] & compositions["train"]
        assert not shared, f"{len(shared)} {held_out} compositions also in train: " \
                           f"{sorted(shared)[:SHOWN]}"
    assert not compositions["val"] & compositions["test"]
    assert len(compositions["test"]) >= 8, "too few test compositions to hold anything out"


def test_held_out_message_compositions_are_not_pretrained_on(splits, pretraining):
    """The pretraining corpus holds no message whose composition is a spam validation or test
    one. (Reviews cannot be checked this way: where one review ends and the next begins in a
    document is not written in the text.)"""
    held_out = _compositions(splits["spam"]["val"] + splits["spam"]["test"])
    found = collections.Counter(value for _, pieces, _ in pretraining
                                for kind, value in pieces or ()
                                if kind == "message" and value in held_out)
    assert not found, f"held-out message compositions in pretraining: {found.most_common(5)}"


# ---------------------------------------------------------------------------------------------
# The checker can fail: hand-written broken text is rejected, with the rule it breaks.
# ---------------------------------------------------------------------------------------------

BROKEN = [
    ("the burgers was great .", "agreement"),
    ("the soup were great .", "agreement"),
    ("i expected the desserts to be great , but it was awful .", "reference"),
    ("i expected the waiter to be great , but it was awful .", "reference"),
    ("i expected the soup to be great , but the tea was awful .", "reference"),
    ("the waiter , which sam recommended , was great .", "agreement"),
    ("the view , which sam ordered , was great .", "meaning"),
    ("the dishes were not bad , and i hated the tea .", "coherence"),
    ("i expected the tea to be great , but it was lovely .", "coherence"),
    ("the soup was great . the meal was awful .", "meaning"),          # food judged twice
    ("the soup was was great .", "repeat"),
    ("the soup was great , , but the tea was awful .", "punctuation"),
    ("the soup was great", "punctuation"),
    ("The soup was great .", "tokens"),
    ("the soup was  great .", "tokens"),
    ("the soup was yummy .", "lexicon"),
    ("the soup great .", "parse"),
    ("sam said the soup was great , but i agree .", "parse"),
    ("congratulations ! you have won a amazing prize . confirm your pin at the link .",
     "article"),
    ("congratulations ! you have won an voucher . confirm your pin at the link .", "article"),
    ("are you free today ? . call me when you can .", "punctuation"),
    ("we still owe sam a fifty euros for the tickets . call me when you can .", "number"),
    ("we still owe sam thousand euros for the tickets . call me when you can .", "number"),
    ("we still owe sam fifty euro for the tickets . call me when you can .", "agreement"),
    ("my keys is broken again . call me when you can .", "agreement"),
    ("limited offer : half price on every keys today . reply stop before friday .",
     "agreement"),
    ("your parcel could not be delivered . reply stop before soon .", "parse"),
    ("are you free today ? call one two three four now to claim it .", "reference"),
    ("hi sam , dear customer , we tried to reach you about your refund of ten pounds . "
     "reply stop before friday .", "reference"),
]


@pytest.mark.parametrize("text, rule", BROKEN, ids=[t[:40] for t, _ in BROKEN])
def test_checker_rejects_broken_text(text, rule):
    with pytest.raises(checker.LanguageError) as caught:
        checker.read(text)
    assert caught.value.rule == rule, str(caught.value)
    assert text in str(caught.value), "the failure message must show the text"


READINGS = [  # text, meaning the checker must read
    ("the dishes were not bad , but i hated the tea .", (("food", True), ("drinks", False))),
    ("i expected the wine to be great , but it was awful . the view could not have been "
     "better .", (("drinks", False), ("view", True))),
    ("sam said the music was dull , but i disagree . the room , which tom booked , was "
     "horrible .", (("music", True), ("room", False))),
    ("i expected the songs to be dull , and they were .", (("music", False),)),
    ("the bed could have been better , whereas the staff was really nice .",
     (("room", False), ("service", True))),
    ("congratulations ! you have won an electric bike . pay the fee of five dollars at the "
     "link .", (("spam", True),)),
    ("i got a text saying i won a laptop , it is a scam . call me when you can . thanks !",
     (("spam", False),)),
    ("hey kim , do not reply to that message about a gift card , it is fake . "
     "reply when you can , no rush .", (("spam", False),)),
    ("the bank called about my card . text stop to one two two three .", (("spam", True),)),
]


@pytest.mark.parametrize("text, meaning", READINGS, ids=[t[:40] for t, _ in READINGS])
def test_checker_reads_meaning(text, meaning):
    assert checker.read(text).meaning == meaning


def test_checker_catches_a_wrong_meaning_and_a_wrong_label():
    rng = random.Random(0)
    review = language.praise_review(rng)
    assert sentence_problems(review, "praise review", *read(review.text)) == []
    flipped = tuple((aspect, not good) for aspect, good in review.meaning)
    wrong = language.Sentence(review.text, flipped, review.skeleton)
    assert "meaning" in {rule for rule, _ in sentence_problems(wrong, "praise review",
                                                               *read(wrong.text))}
    label = _praised_class(review.meaning)
    assert split_problems(review.text, label, "aspect", *read(review.text)) == []
    wrong_label = (label + 1) % len(data.TASKS["aspect"])
    assert [rule for rule, _ in split_problems(review.text, wrong_label, "aspect",
                                               *read(review.text))] == ["label"]
    ham = language.message(rng, "ham")
    assert [rule for rule, _ in sentence_problems(ham, "spam", *read(ham.text))] == ["label"]


def test_leak_checks_find_planted_leaks():
    corpus = checker.SentenceIndex(["i hated the tea . the soup was great .",
                                    "the soup was great , and the tea was nice ."])
    assert corpus.find("the soup was great .") == 0             # a run of whole sentences
    assert corpus.find("i hated the tea . the soup was great .") == 0   # a whole document
    assert corpus.find("the tea was nice .") is None            # part of a sentence only
    assert corpus.find("the soup was great . i hated the tea .") is None
    first = checker.read("the soup was great . i hated the tea .").composition
    second = checker.read("the meal was lovely . i disliked the wine .").composition
    assert first == second                                      # open words abstracted away
    assert first != checker.read("the soup was not bad . i hated the tea .").composition


def test_style_notes_flag_awkward_text():
    assert checker.style_notes("the soup was great , but the tea was bad , but the room was "
                               "nice .")
    assert checker.style_notes("your keys order is waiting . reply stop before friday .")
    assert not checker.style_notes("the soup was great , but the tea was bad .")

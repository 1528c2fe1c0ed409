"""LoRA for generation (lora_course/generation.py): masking, greedy decoding, data, bad input."""
import math

import pytest
import torch
from torch.nn import functional as F

from lora_course import data, generation as g
from lora_course.gpt import load_pretrained_gpt


@pytest.fixture(scope="module")
def base():
    return load_pretrained_gpt()


def test_prompt_is_masked_and_loss_is_cross_entropy_over_response_tokens_only(base):
    ex = [g.Example("the soup was good , and i loved the wine . in short ,",
                    "the soup was good , and the wine was good ."),
          g.Example("hi sam , are you free today ? is it a scam ?", "no .")]
    inputs, targets = g.encode_examples(ex)
    for e, row, tgt in zip(ex, inputs, targets):
        p, r = len(data.TOKENIZER.encode(e.prompt)), data.TOKENIZER.encode(e.response)
        counted = tgt[tgt != -100].tolist()
        assert counted == r + [data.TOKENIZER.eos_id]                  # response + <eos>, nothing else
        assert (tgt[:p - 1] == -100).all() and tgt[p - 1] == r[0]      # first counted: predicted from the last prompt token
    logits = base(inputs)
    # by hand: -log softmax at every counted position, averaged over the counted positions only
    logp = torch.log_softmax(logits, -1)
    terms = [-logp[i, t, targets[i, t]] for i in range(len(ex)) for t in range(targets.shape[1]) if targets[i, t] != -100]
    by_hand = torch.stack(terms).mean()
    ours = g.masked_loss(logits, targets)
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert torch.allclose(ours, by_hand, atol=1e-6) and torch.allclose(ours, reference, atol=1e-6)
    unmasked_inputs, unmasked = g.encode_examples(ex, mask_prompt=False)
    assert torch.equal(unmasked_inputs, inputs)
    assert (unmasked != -100).sum() > (targets != -100).sum()           # the prompt counts there


def test_greedy_generation_equals_step_by_step_argmax(base):
    prompts = ["the soup was good , and i loved the wine . in short ,", "hi sam , are you free today ?",
               "the room was bad"]
    got = g.greedy_generate(base, prompts, max_new_tokens=10)
    for prompt, text in zip(prompts, got):
        ids = data.TOKENIZER.encode(prompt)
        new = []
        with torch.no_grad():
            for _ in range(10):
                nxt = int(base(torch.tensor([ids]))[0, -1].argmax())
                if nxt == data.TOKENIZER.eos_id:
                    break
                new.append(nxt)
                ids.append(nxt)
        assert text == data.TOKENIZER.decode(new)


def test_skill_data_is_deterministic_correct_and_leak_free():
    first, again = g.skill_splits("plain"), g.skill_splits("plain")
    assert first == again and [len(first[k]) for k in data.SPLIT_NAMES] == list(g.SPLIT_SIZES)
    pretraining = data.sentence_runs(data.pretraining_texts())
    reviews = g.review_splits()
    texts = {k: [s.text for s in v] for k, v in reviews.items()}
    assert sum(map(len, texts.values())) == len(set().union(*map(set, texts.values())))   # none twice
    for name in ("val", "test"):
        assert not set(texts[name]) & pretraining
        assert all(data.skeleton_split(s.skeleton) == name for s in reviews[name])
        assert not {s.skeleton for s in reviews[name]} & {s.skeleton for s in reviews["train"]}
    assert not set(texts["train"]) & pretraining
    best = g.skill_splits("best")
    for s, b, p in zip(reviews["train"][:200], best["train"], first["train"]):
        praised = [a for a, good in s.meaning if good]
        assert b.response in {f"the {n.word} ." for n in data.language.ASPECTS[praised[0]]}
        assert b.prompt.endswith(g.SEPARATORS["best"]) and p.prompt.endswith(g.SEPARATORS["plain"])
        assert p.response.count("good") == 1 and p.response.count("bad") == 1 and ", but" in p.response
    scam = g.skill_splits("scam")
    assert {e.response for e in scam["train"]} == {"yes .", "no ."}
    assert not {e.prompt for e in scam["test"]} & {e.prompt for e in scam["train"]}
    for skill in g.SKILLS:  # every prompt and response uses known words and fits the context
        for e in g.skill_splits(skill)["test"]:
            g.encode_examples([e])


def test_plain_rewrite_agrees_in_number():
    s = data.language.Sentence("the dishes were not bad , but i hated the wine .",
                               (("food", True), ("drinks", False)), ())
    assert g.response_for("plain", s) == "the dishes were good , but the wine was bad ."
    assert g.response_for("best", s) == "the dishes ."


def test_bad_input_is_refused_clearly(base):
    with pytest.raises(ValueError, match="empty response"):
        g.encode_examples([g.Example("the soup was good . in short ,", "")])
    with pytest.raises(ValueError, match="empty prompt"):
        g.encode_examples([g.Example("", "yes .")])
    with pytest.raises(ValueError, match="do not fit in the context of 48"):
        g.encode_examples([g.Example(" ".join(["the"] * 47), "yes .")])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        g.encode_examples([g.Example("is it a scam ?", "maybe .")])
    with pytest.raises(ValueError, match="no room in the context"):
        g.greedy_generate(base, [" ".join(["the"] * 48)])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        g.greedy_generate(base, [""])
    with pytest.raises(TypeError, match="wrap it in a list"):
        g.greedy_generate(base, "the soup was good")
    with pytest.raises(ValueError, match="unknown skill"):
        g.skill_splits("summarise")
    with pytest.raises(ValueError, match="no trainable parameter"):
        frozen = g.full_model(base).requires_grad_(False)
        g.train_generator(frozen, g.skill_splits("scam")["train"][:4], steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="every target is -100"):
        g.masked_loss(torch.zeros(1, 3, 5), torch.full((1, 3), -100))
    assert math.isfinite(g.masked_loss(torch.zeros(1, 3, 5), torch.tensor([[-100, 1, 2]])).item())

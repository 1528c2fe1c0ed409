"""The tiny GPT against PyTorch's own attention, checkpoints, and the training loop."""
import math

import pytest
import torch
from torch import nn

from lora_course.data import CONTEXT_LENGTH, TOKENIZER, classification_splits, encode_batch, lm_batch
from lora_course.gpt import GPTConfig, GPTModel, MultiHeadAttention, load_checked_state, load_gpt, save_gpt
from lora_course.training import EncodedSplit, evaluate, make_classifier, train_classifier

CFG = GPTConfig(vocab_size=len(TOKENIZER), context_length=CONTEXT_LENGTH, emb_dim=32, n_heads=4, n_layers=2)


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiHeadAttention(16, 16, num_heads=4, dropout=0.0)
    ref = nn.MultiheadAttention(16, 4, bias=False, batch_first=True)
    with torch.no_grad():  # same weights: PyTorch packs q, k, v into one (3·D × D) matrix
        ref.in_proj_weight.copy_(torch.cat([ours.W_query.weight, ours.W_key.weight, ours.W_value.weight]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
    ref.out_proj.bias = nn.Parameter(ours.out_proj.bias.detach().clone())
    x = torch.randn(2, 7, 16)
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)
    expected, _ = ref(x, x, x, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


def test_causal_model_ignores_right_padding():
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    ids, lengths = encode_batch(["hi sam , are you free tonight ?"])
    short = model(ids[:, : lengths[0]])
    padded = model(ids)[:, : lengths[0]]
    torch.testing.assert_close(padded, short)


def test_lm_batch_targets_are_next_tokens_and_padding_is_ignored():
    inputs, targets = lm_batch(["thanks for the pizza"])
    tokens = TOKENIZER.encode("thanks for the pizza") + [TOKENIZER.eos_id]
    assert inputs[0, :4].tolist() == tokens[:4]
    assert targets[0, :4].tolist() == tokens[1:]
    assert (targets[0, 4:] == -100).all()


def test_save_load_round_trip_and_architecture_mismatch(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(CFG)
    save_gpt(model, tmp_path / "m.safetensors", extra={"val_loss": 1.5})
    loaded, info = load_gpt(tmp_path / "m.safetensors")
    assert info == {"val_loss": 1.5}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    other = GPTModel(GPTConfig(vocab_size=len(TOKENIZER), context_length=CONTEXT_LENGTH, emb_dim=48, n_heads=4, n_layers=2))
    with pytest.raises(ValueError, match=r"different architecture: 'tok_emb.weight' has shape \(\d+, 32\) there but \(\d+, 48\)"):
        load_checked_state(other, model.state_dict(), source="m.safetensors")
    deeper = GPTModel(GPTConfig(vocab_size=len(TOKENIZER), context_length=CONTEXT_LENGTH, emb_dim=32, n_heads=4, n_layers=3))
    with pytest.raises(ValueError, match=r"has no tensor 'trf_blocks.2"):
        load_checked_state(deeper, model.state_dict())


def test_missing_checkpoint_says_how_to_regenerate(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m lora_course.pretrain"):
        load_gpt(tmp_path / "nope.safetensors")


def test_make_classifier_copies_and_training_learns():
    torch.manual_seed(0)
    base = GPTModel(CFG)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    splits = classification_splits("spam", n_train=256, n_val=128, n_test=2)
    model = make_classifier(base, seed=1)
    assert model.out_head.out_features == 2 and base.out_head.out_features == len(TOKENIZER)
    # Same seed, same head: runs are comparable.
    assert torch.equal(make_classifier(base, seed=1).out_head.weight, model.out_head.weight)
    loss_before, _ = evaluate(model, splits["val"])
    history = train_classifier(model, splits["train"], splits["val"], steps=40, lr=3e-3, eval_every=20, progress=False)
    assert history.eval_steps == [20, 40] and len(history.train_loss) == 40
    assert history.final_val_loss < loss_before
    assert history.trainable_parameters == sum(p.numel() for p in model.parameters())
    assert all(torch.equal(base_state[k], v) for k, v in base.state_dict().items())  # base untouched


def test_training_is_repeatable():
    torch.manual_seed(0)
    base = GPTModel(CFG)
    splits = classification_splits("spam", n_train=128, n_val=64, n_test=2)
    train = EncodedSplit.from_split(splits["train"])
    runs = [train_classifier(make_classifier(base), train, splits["val"], steps=10, eval_every=10, progress=False)
            for _ in range(2)]
    assert runs[0].train_loss == runs[1].train_loss


def test_training_without_trainable_parameters_is_refused():
    model = make_classifier(GPTModel(CFG))
    for p in model.parameters():
        p.requires_grad_(False)
    splits = classification_splits("spam", n_train=8, n_val=8, n_test=2)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_classifier(model, splits["train"], splits["val"], steps=1, progress=False)


def test_initial_lm_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPTModel(CFG)
    from lora_course.training import language_model_loss
    loss = language_model_loss(model, ["thanks for the pizza , it was very tasty"])
    assert abs(loss - math.log(len(TOKENIZER))) < 0.5


def test_make_classifier_leaves_global_random_state_alone():
    base = GPTModel(CFG)
    state = torch.get_rng_state()
    make_classifier(base, seed=5)
    assert torch.equal(torch.get_rng_state(), state)

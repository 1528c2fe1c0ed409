"""scripts/appendix_e.py offline: its data code against pandas (what the book uses), its loaders on
small files generated here (a fake SMS Spam Collection, a tiny tokenizer, a tiny random GPT-2
saved by transformers), the no-network stop, one short end-to-end run, and the book's
parameter counts on a GPT-2-124M-shaped course model. Nothing is downloaded."""
import importlib.util
import io
import json
import math
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lora_course.architectures import lora_parameters, with_separate_qkv
from lora_course.gpt import GPTConfig, GPTModel
from lora_course.lora import LinearWithLoRA

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "appendix_e.py"
_spec = importlib.util.spec_from_file_location("appendix_e", SCRIPT)
appendix_e = importlib.util.module_from_spec(_spec)
sys.modules["appendix_e"] = appendix_e
_spec.loader.exec_module(appendix_e)

#: Records that exercise every rule of pandas' tab-separated parsing the real file needs.
TRICKY_TSV = ('ham\tGo until jurong point, crazy..\n'
              'spam\t"Free entry" in 2 a wkly comp\n'
              'ham\t"Quoted whole"\n'
              'ham\tHe said "hi" to me\n'
              'ham\t"starts quoted, spans\nnext line" and more\n'
              '\n'
              'spam\t"doubled ""quote"" inside"\n'
              'ham\tunicode £ é 😀\r\n'
              'ham\t"unclosed quote goes on\nham\tswallowing this line\n'
              'ham\tlast "one"\n')


def _fake_collection(n_ham, n_spam):
    rows = [("ham", f"ham message number {i}, see you at {i % 7} pm") for i in range(n_ham)]
    rows += [("spam", f"WIN a prize {i}! call 0800{i:04d} now") for i in range(n_spam)]
    return rows[::2] + rows[1::2]  # ham and spam mixed, as in the real file


def _write_tsv(path, rows):
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return path


def test_parsing_equals_pandas_read_csv(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(TRICKY_TSV.encode("utf-8"))
    expected = [tuple(r) for r in pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"]).values.tolist()]
    assert appendix_e.read_sms_collection(path) == expected
    assert len(expected) == 8  # 10 lines with text: two quoted fields swallow a line each


def test_zip_is_read_like_the_tsv_inside(tmp_path):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(TRICKY_TSV.encode("utf-8"))
    with zipfile.ZipFile(tmp_path / "sms.zip", "w") as archive:
        archive.write(path, "SMSSpamCollection")
        archive.writestr("readme", "the UCI zip also holds a readme")
    assert appendix_e.read_sms_collection(tmp_path / "sms.zip") == appendix_e.read_sms_collection(path)


def test_bad_data_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)no data file .*--data-file"):
        appendix_e.read_sms_collection(tmp_path / "missing.tsv")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("data.csv", "x")
    with pytest.raises(ValueError, match="has no file 'SMSSpamCollection'"):
        appendix_e.read_sms_collection(tmp_path / "other.zip")
    (tmp_path / "bad.tsv").write_text("ham\thello\nnot a record\n")
    with pytest.raises(ValueError, match="record 2: expected 'ham' or 'spam'"):
        appendix_e.read_sms_collection(tmp_path / "bad.tsv")


def test_balance_and_split_equal_the_books_pandas_code():
    """The book's create_balanced_dataset and random_split, run with pandas on the same rows."""
    pd = pytest.importorskip("pandas")
    rows = _fake_collection(4825, 747)
    df = pd.DataFrame(rows, columns=["Label", "Text"])
    ham = df[df["Label"] == "ham"].sample(747, random_state=123)
    balanced = pd.concat([ham, df[df["Label"] == "spam"]])
    shuffled = balanced.sample(frac=1, random_state=123).reset_index(drop=True)
    expected = [tuple(r) for r in shuffled.values.tolist()]
    train, val, test = appendix_e.random_split(appendix_e.balance(rows))
    assert (len(train), len(val), len(test)) == (1045, 149, 300)  # the book's split
    assert train + val + test == expected


# --------------------------------------------------------------------------------------------
# Tokens and loaders
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A folder laid out like a GPT-2 download: a tiny byte-level BPE tokenizer.json with
    <|endoftext|>, and a tiny random GPT-2 saved by transformers."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = ByteLevelBPETokenizer()
    texts = [text for _, text in _fake_collection(60, 20)] + ["Every effort moves you"]
    tokenizer.train_from_iterator(texts, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer.save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                     vocab_size=tokenizer.get_vocab_size())
    transformers.GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    return path


def test_encode_pads_with_endoftext_and_cuts_to_the_train_length(model_dir):
    tokenizer = appendix_e.load_tokenizer(model_dir)
    pad = appendix_e.pad_token_id(tokenizer)
    assert tokenizer.id_to_token(pad) == "<|endoftext|>"
    rows = [("ham", "see you"), ("spam", "WIN a prize 7! call 08000007 now")]
    ids, labels, length = appendix_e.encode(rows, tokenizer, pad)
    longest = len(tokenizer.encode(rows[1][1]).ids)
    assert length == longest and ids.shape == (2, longest)
    assert labels.tolist() == [0, 1]
    short = len(tokenizer.encode("see you").ids)
    assert ids[0, short:].eq(pad).all() and not ids[0, :short].eq(pad).any()
    cut, _, _ = appendix_e.encode(rows, tokenizer, pad, max_length=3)
    assert cut[1].tolist() == tokenizer.encode(rows[1][1]).ids[:3]


def test_loaders_have_the_books_batch_counts(model_dir):
    tokenizer = appendix_e.load_tokenizer(model_dir)
    splits = appendix_e.random_split(appendix_e.balance(_fake_collection(4825, 747)))
    train, val, test, _ = appendix_e.make_loaders(splits, tokenizer)
    assert (len(train), len(val), len(test)) == (130, 19, 38)  # drop_last on train only
    assert all(len(labels) == 8 for _, labels in train)


def test_missing_tokenizer_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)no tokenizer\.json .*huggingface\.co/openai-community/gpt2"):
        appendix_e.load_tokenizer(tmp_path)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def _book_shaped_classifier(device="meta"):
    cfg = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12, qkv_bias=True)
    with torch.device(device):
        model = GPTModel(cfg)
    return appendix_e.add_classification_head(model)


def test_book_counts_on_a_gpt2_124m_shaped_model():
    model = _book_shaped_classifier()
    assert appendix_e.trainable_parameters(model) == 124_441_346  # appendix E, before freezing
    # rank 16 on the 768 -> 2 head: allowed, as in appendix E and PEFT, with a warning that it
    # only adds parameters (A·B has rank 2 at most)
    with pytest.warns(UserWarning, match="rank 16 on layer 'out_head'"):
        trainable = appendix_e.add_lora(model, rank=16, alpha=16)
    expected = lora_parameters(with_separate_qkv("gpt2-small"), 16, "all-linear") + 16 * (768 + 2)
    assert trainable == expected == 2_666_528
    assert appendix_e.total_parameters(model) == 127_107_874


def test_book_count_before_freezing_on_a_gpt2_124m_shaped_model():
    model = _book_shaped_classifier()
    # GPT-2's 124,439,808 (its tied head replaced) + the new head 768 x 2 + 2
    assert appendix_e.trainable_parameters(model) == 124_439_808 + 1_538 == 124_441_346


def _small_classifier():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, qkv_bias=True))
    return appendix_e.add_classification_head(model)


def test_book_a_init_draws_what_the_books_lora_layer_draws():
    model = _small_classifier()
    torch.manual_seed(5)
    appendix_e.add_lora(model, rank=2, alpha=2, a_init="book")
    # the book's LoRALayer: A = empty(in, r); kaiming_uniform_(A, a=sqrt(5)), layer after layer
    torch.manual_seed(5)
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            A = torch.empty(module.in_features, 2)
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            assert torch.equal(module.lora.A, A), name
            assert module.lora.A.abs().max() <= 1 / math.sqrt(2)  # fan_in = r: bound 1/sqrt(r)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora." not in n)


def test_course_a_init_keeps_the_course_scale():
    model = _small_classifier()
    appendix_e.add_lora(model, rank=2, alpha=2, a_init="course")
    q = model.trf_blocks[0].att.W_query
    assert q.lora.A.abs().max() <= 1 / math.sqrt(16)  # fan_in = in_features: bound 1/sqrt(16)
    with pytest.raises(ValueError, match="a_init must be"):
        appendix_e.add_lora(_small_classifier(), rank=2, alpha=2, a_init="paper")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def test_without_network_it_stops_at_once_and_says_how(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    def must_not_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded without a network")

    monkeypatch.setattr(appendix_e.socket, "create_connection", no_network)
    monkeypatch.setattr(appendix_e, "download", must_not_download)
    assert appendix_e.main(["--work-dir", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert "Cannot reach archive.ics.uci.edu, huggingface.co" in message
    assert "--model-dir" in message and "config.json, model.safetensors, tokenizer.json" in message
    assert "--data-file" in message and "sms+spam+collection.zip" in message
    assert not any(tmp_path.iterdir())


def test_end_to_end_on_small_files_without_network(model_dir, tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("with both files given, the script must not touch the network")

    monkeypatch.setattr(appendix_e.socket, "create_connection", no_network)
    data = _write_tsv(tmp_path / "SMSSpamCollection", _fake_collection(50, 14))
    code = appendix_e.main(["--model-dir", str(model_dir), "--data-file", str(data), "--epochs", "1",
                            "--rank", "2", "--alpha", "2", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "train / validation / test" in out and "19 / 2 / 7" in out  # 28 balanced: int(19.6), int(2.8), rest
    assert "Ep 1 (Step 000000): Train loss" in out
    # LoRA rank 2 on every Linear of a 2-block GPT of width 32, and on the 32 -> 2 head
    d, r = 32, 2
    expected = 2 * (4 * r * (d + d) + r * (d + 4 * d) + r * (4 * d + d)) + r * (d + 2)
    line = next(line for line in out.splitlines() if "trainable LoRA parameters" in line)
    assert line.split() == ["trainable", "LoRA", "parameters", f"{expected:,}", "book:", "2,666,528"]
    assert "test accuracy after training" in out

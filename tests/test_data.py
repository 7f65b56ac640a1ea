"""Corpora, tokenizers and batches (minids/data.py): the default stdlib corpus, folders / files / globs /
JSONL, the deterministic document split, the byte and BPE tokenizers, and TokenData's windows and bits per
byte, each checked against values written out here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from minids.data import (
    ByteTokenizer, DataError, HFTokenizer, TokenData, get_tokenizer, load_documents, load_saved_tokenizer,
    split_documents,
)

DOCS = [
    ("a.py", "def add(a, b):\n    return a + b\n"),
    ("b.py", "class Stack:\n    def __init__(self):\n        self.items = []\n"),
    ("c.py", "for i in range(10):\n    print(i * i)  # squares\n"),
    ("d.py", "import json\nprint(json.dumps({'key': [1, 2, 3]}))\n"),
    ("e.py", "x = 'héllo wörld — ünïcode ✓'\nassert len(x) > 0\n"),
]


def write_files(root, docs=DOCS):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs:
        (root / name).write_text(text, encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------------ corpora
def test_default_corpus_is_the_stdlib():
    docs, desc = load_documents()
    assert len(docs) > 300
    assert all(name.endswith(".py") for name, _ in docs)
    assert [n for n, _ in docs] == sorted(n for n, _ in docs)
    assert not any(n.split("/")[0] in ("test", "idlelib", "lib2to3") for n, _ in docs)
    nbytes = sum(len(t.encode()) for _, t in docs)
    assert 5e6 < nbytes < 30e6, nbytes  # about 11 MB
    assert "standard library" in desc and "sha256" in desc and f"{len(docs)} documents" in desc
    assert load_documents(None)[1] == desc  # deterministic: the same hash again


def test_folder_file_and_glob(tmp_path):
    root = write_files(tmp_path / "src")
    (root / "sub").mkdir()
    (root / "sub" / "f.txt").write_text("nested text\n")
    (root / "empty.py").write_text("")  # empty documents are dropped

    docs, desc = load_documents(str(root))
    names = [n for n, _ in docs]
    assert names == sorted(str(root / n) for n in ["a.py", "b.py", "c.py", "d.py", "e.py", "sub/f.txt"])
    assert dict(docs)[str(root / "e.py")] == DOCS[4][1]
    assert str(root) in desc and "6 documents" in desc and "sha256" in desc
    assert load_documents(str(root))[1] == desc

    one, desc1 = load_documents(str(root / "c.py"))
    assert one == [(str(root / "c.py"), DOCS[2][1])] and "1 documents" in desc1

    globbed, _ = load_documents(str(root / "*.py"))
    assert [n for n, _ in globbed] == [str(root / n) for n in ["a.py", "b.py", "c.py", "d.py", "e.py"]]
    recursive, _ = load_documents(str(root / "**" / "*.txt"))
    assert [n for n, _ in recursive] == [str(root / "sub" / "f.txt")]

    # a change of content changes the hash
    (root / "a.py").write_text("def add(a, b):\n    return b + a\n")
    assert load_documents(str(root))[1] != desc


def test_jsonl(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps({"text": "first doc", "id": 1}) + "\n\n" + json.dumps({"text": "second ✓"}) + "\n")
    docs, desc = load_documents(str(f))
    assert docs == [(f"{f}:1", "first doc"), (f"{f}:3", "second ✓")]
    assert "2 documents" in desc

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:2: a JSONL record needs a string 'text' field"):
        load_documents(str(bad))
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        load_documents(str(bad))


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(DataError, match="no such file, folder or glob match"):
        load_documents(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no such file"):
        load_documents(str(tmp_path / "*.nothing"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        load_documents(str(tmp_path / "empty.txt"))


def test_split_documents():
    docs = [(f"pkg/mod_{i}.py", f"x = {i}\n") for i in range(200)]
    train, val = split_documents(docs, 0.1)
    assert train and val and len(train) + len(val) == 200
    assert 5 <= len(val) <= 40  # about 10%
    assert split_documents(list(docs), 0.1) == (train, val)  # deterministic
    assert {n for n, _ in train}.isdisjoint(n for n, _ in val)
    # adding documents never moves an existing one to the other side
    more = docs + [(f"pkg/new_{i}.py", "y = 1\n") for i in range(50)]
    train2, val2 = split_documents(more, 0.1)
    assert set(train) <= set(train2) and set(val) <= set(val2)
    # the order of documents does not matter either
    t3, v3 = split_documents(list(reversed(docs)), 0.1)
    assert set(t3) == set(train) and set(v3) == set(val)
    # tiny corpora: the last document validates
    assert split_documents(DOCS[:2], 0.02) == (DOCS[:1], DOCS[1:2])
    # one document: its tail validates, so no text is in both parts
    (name, text), = DOCS[:1]
    train1, val1 = split_documents(DOCS[:1], 0.5)
    cut = len(text) // 2
    assert train1 == [(name, text[:cut])] and val1 == [(f"{name} (tail)", text[cut:])]


# ------------------------------------------------------------------------------------------------ tokenizers
def test_byte_tokenizer():
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and (tok.vocab_size, tok.eos_id) == (257, 256)
    text = "def f():\n\treturn 'héllo — ✓ 𝔘'"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert len(ids) > len(text)  # multi-byte characters
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text  # the end-of-document token decodes to nothing
    tb = tok.token_bytes()
    assert tb.shape == (257,) and tb[:256].eq(1).all() and tb[256] == 0


def test_bpe_tokenizer_trains_saves_and_reloads(tmp_path):
    docs = [(f"d{i}", text * 3) for i, (_, text) in enumerate(DOCS)]
    tok = get_tokenizer("bpe:300", docs)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300
    assert tok.eos_id == tok.tok.token_to_id("<|endoftext|>")
    for _, text in DOCS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode())  # merges shorten the byte sequence
    tb = tok.token_bytes()
    assert tb[tok.eos_id] == 0 and (tb[torch.arange(300) != tok.eos_id] >= 1).all()
    ids = tok.encode(DOCS[3][1])
    assert int(tb[ids].sum()) == len(DOCS[3][1].encode())  # the token bytes add up to the text's bytes

    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    for again in (get_tokenizer(str(tmp_path / "tokenizer.json")), get_tokenizer(str(tmp_path)),
                  load_saved_tokenizer(tmp_path)):
        assert again.vocab_size == 300 and again.eos_id == tok.eos_id
        for _, text in DOCS:
            assert again.encode(text) == tok.encode(text)
    assert torch.equal(get_tokenizer(str(tmp_path)).token_bytes(), tb)
    # a byte tokenizer saved by a run reloads as one
    (tmp_path / "byte_run").mkdir()
    ByteTokenizer().save(tmp_path / "byte_run")
    assert isinstance(load_saved_tokenizer(tmp_path / "byte_run"), ByteTokenizer)
    assert load_saved_tokenizer(tmp_path / "nothing_here") is None


@pytest.mark.parametrize("spec, needle", [
    ("bpe:abc", "write bpe:VOCAB with an integer"),
    ("bpe:100", "at least 260"),
    ("/no/such/tokenizer.json", "not 'byte', 'bpe:VOCAB' or an existing tokenizer.json"),
    ("bytes", "not 'byte', 'bpe:VOCAB' or an existing tokenizer.json"),
])
def test_bad_tokenizer_specs(spec, needle):
    with pytest.raises(DataError) as e:
        get_tokenizer(spec, DOCS)
    assert needle in str(e.value) and repr(spec) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ TokenData
@pytest.fixture()
def data() -> TokenData:
    tok = ByteTokenizer()
    train_docs = [(f"t{i}", f"line {i}: " + "abcdefghij"[i % 10] * (20 + i)) for i in range(30)]
    return TokenData.build(train_docs, DOCS, tok)


def test_token_streams(data):
    assert data.train.dtype == data.val.dtype == torch.int32
    expected_val = []
    for _, text in DOCS:
        expected_val += list(text.encode("utf-8")) + [256]
    assert data.val.tolist() == expected_val
    assert int((data.train == 256).sum()) == 30


def test_train_batch(data):
    S = 16
    a = data.train_batch(4, S, seed=3, step=7, micro=0)
    assert a.shape == (4, S) and a.dtype == torch.long
    assert torch.equal(a, data.train_batch(4, S, seed=3, step=7, micro=0))  # a function of (seed, step, micro)
    for other in (dict(seed=3, step=8, micro=0), dict(seed=3, step=7, micro=1), dict(seed=4, step=7, micro=0)):
        assert not torch.equal(a, data.train_batch(4, S, **other)), other
    # every row is a real window of the training stream
    windows = data.train.long().unfold(0, S, 1)  # (T - S + 1, S)
    for row in a:
        assert (windows == row).all(dim=1).any(), row
    # with a stream of distinct tokens the offsets can be read off: contiguous windows, in range, spread out
    T = 1000
    numbered = TokenData(torch.arange(T, dtype=torch.int32), data.val, data.token_bytes)
    starts = []
    for step in range(50):
        b = numbered.train_batch(4, S, 0, step, 0)
        assert torch.equal(b, b[:, :1] + torch.arange(S))
        starts += b[:, 0].tolist()
    assert 0 <= min(starts) and max(starts) + S <= T
    assert len(set(starts)) > 150 and max(starts) - min(starts) > T // 2


def test_val_batches(data):
    S = 8
    batches = list(data.val_batches(3, S, max_tokens=100))
    n = 100 // S  # 12 windows
    assert [b.shape[0] for b in batches] == [3, 3, 3, 3] and all(b.shape[1] == S for b in batches)
    assert torch.equal(torch.cat(batches).flatten(), data.val[: n * S].long())  # consecutive from the start
    assert sum(b.numel() for b in batches) <= 100
    # bounded by the stream too
    everything = list(data.val_batches(5, S, max_tokens=10**9))
    assert torch.cat(everything).numel() == (len(data.val) // S) * S
    # at least one window even for a tiny budget
    assert [b.shape for b in data.val_batches(4, S, max_tokens=1)] == [(1, S)]


def test_check_too_short(data):
    data.check(16)
    with pytest.raises(DataError, match=rf"the validation split has {len(data.val)} tokens, fewer than one sequence"):
        data.check(len(data.val))
    short = TokenData(torch.arange(10, dtype=torch.int32), data.val, data.token_bytes)
    with pytest.raises(DataError) as e:
        short.check(16)
    assert "training split has 10 tokens" in str(e.value) and "--seq_len" in str(e.value)


def test_bits_per_byte_by_hand(data):
    targets = torch.tensor([[104, 195, 169, 256], [32, 10, 256, 256]])  # 5 byte tokens, 3 end-of-document
    assert data.bits_per_byte(10.0, targets) == pytest.approx(10.0 / (math.log(2) * 5))
    # uniform over 257 tokens: ln(257) nats per token; per byte that is log2(257) * tokens / bytes
    loss_sum = math.log(257) * targets.numel()
    assert data.bits_per_byte(loss_sum, targets) == pytest.approx(math.log2(257) * 8 / 5)
    # the validation stream as targets (its first token is never predicted): every UTF-8 byte but the first
    t = data.val[1:].long()
    nbytes = sum(len(text.encode("utf-8")) for _, text in DOCS) - 1
    assert data.bits_per_byte(1.0, t) == pytest.approx(1.0 / (math.log(2) * nbytes))

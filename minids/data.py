"""Corpora, tokenizers and batches for training.

Corpus (``load_documents``):
- the default, embedded and offline: the Python standard library's own ``.py`` files of the running
  interpreter (tests, idlelib and lib2to3 left out; about 11 MB of real code), in sorted path order;
  its content hash is logged so a run says exactly what it trained on;
- a text file, a folder (all files under it, sorted), a glob, or a ``.jsonl`` file (its ``text`` field);
- ``hf:NAME[:SPLIT]``: a Hugging Face ``datasets`` dataset (optional extra, needs network).
Documents are split into train and validation by a hash of their name (deterministic, stable when
documents are added).

Tokenizers (``get_tokenizer``): ``byte`` (256 byte values + an end-of-document token, the default),
``bpe:VOCAB`` (a byte-level BPE trained on the training documents with the ``tokenizers`` library and
saved in the run directory), or the path of a ``tokenizer.json``.

Batches: documents are concatenated with an end-of-document token into one token stream per split.
Training windows are drawn at random offsets from a generator seeded by (seed, step, micro-batch), so
the data position is the step number itself and a resumed run sees exactly the batches it would have
seen. Validation uses fixed consecutive windows. Bits per byte = summed cross-entropy / (ln 2 * the
UTF-8 bytes of the predicted tokens): comparable across tokenizers.

Shapes: B batch, S sequence length, V vocabulary.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from minids.fileio import atomic_write_text, written_whole

__all__ = ["ByteTokenizer", "HFTokenizer", "TokenData", "get_tokenizer", "load_documents", "split_documents"]

EXCLUDED_STDLIB = ("test", "tests", "idlelib", "lib2to3", "site-packages")


class DataError(ValueError):
    """Missing or empty data, or a tokenizer that cannot be used; the message says what to do."""


def load_documents(spec: str | None = None) -> tuple[list[tuple[str, str]], str]:
    """[(name, text)] and a one-line description with the content hash."""
    if spec in (None, "", "stdlib"):
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(f for f in root.rglob("*.py") if not set(f.relative_to(root).parts) & set(EXCLUDED_STDLIB))
        docs = [(str(f.relative_to(root)), f.read_text(encoding="utf-8", errors="replace")) for f in files]
        what = f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library ({root})"
    elif spec.startswith("hf:"):
        docs, what = _hf_documents(spec[3:])
    else:
        docs, what = _path_documents(spec)
    docs = [(n, t) for n, t in docs if t]
    if not docs:
        raise DataError(f"data {spec!r}: no non-empty documents found")
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode())
        h.update(text.encode())
    nbytes = sum(len(t.encode()) for _, t in docs)
    return docs, f"{what}: {len(docs)} documents, {nbytes / 1e6:.1f} MB, sha256 {h.hexdigest()[:16]}"


def _path_documents(spec: str) -> tuple[list[tuple[str, str]], str]:
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files and p.is_dir():
        raise DataError(f"data {spec!r}: the folder holds no files")
    if not files:
        raise DataError(f"data {spec!r}: no such file, folder or glob match")
    docs = []
    for f in files:
        if f.suffix == ".jsonl":
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text (byte {e.start}); JSONL files must be UTF-8") from None
            for i, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}:{i + 1}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f"{f}:{i + 1}: a JSONL record needs a string 'text' field")
                docs.append((f"{f}:{i + 1}", rec["text"]))
        else:
            docs.append((str(f), f.read_text(encoding="utf-8", errors="replace")))
    return docs, f"{spec}"


def _hf_documents(spec: str) -> tuple[list[tuple[str, str]], str]:
    try:
        import datasets
    except ImportError:
        raise DataError("hf: data needs the datasets package: pip install 'minids[data]'") from None
    name, _, split = spec.partition(":")
    ds = datasets.load_dataset(name, split=split or "train")
    if "text" not in ds.column_names:
        raise DataError(f"hf:{spec}: the dataset has no 'text' column (columns: {ds.column_names})")
    return [(f"{name}:{i}", t) for i, t in enumerate(ds["text"])], f"hf:{spec}"


def split_documents(docs: list[tuple[str, str]], val_fraction: float) -> tuple[list, list]:
    """Deterministic split by a hash of each document's name; at least one document in each part."""
    if len(docs) == 1:  # one document: its tail validates, so no text is in both parts
        name, text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        return [(name, text[:cut])], [(f"{name} (tail)", text[cut:])]
    key = [int(hashlib.md5(n.encode()).hexdigest()[:8], 16) / 2**32 for n, _ in docs]
    val = [d for d, k in zip(docs, key) if k < val_fraction]
    train = [d for d, k in zip(docs, key) if k >= val_fraction]
    if not val or not train:  # tiny corpora: the last document validates
        train, val = docs[:-1], docs[-1:]
    return train, val


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, and 256 = end of document."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        """(V,) UTF-8 bytes each token stands for."""
        b = torch.ones(self.vocab_size, dtype=torch.long)
        b[self.eos_id] = 0
        return b

    def save(self, directory: Path) -> None:
        atomic_write_text(json.dumps({"type": "byte"}) + "\n", Path(directory) / "tokenizer_minids.json")


class HFTokenizer:
    """A ``tokenizers`` tokenizer (a trained BPE, or any ``tokenizer.json``)."""

    EOS = "<|endoftext|>"

    def __init__(self, tok, name: str):
        self.tok = tok
        self.name = name
        self.vocab_size = tok.get_vocab_size()
        eos = tok.token_to_id(self.EOS)
        if eos is None:
            eos = tok.token_to_id("</s>") or tok.token_to_id("<｜end▁of▁sentence｜>")
        if eos is None:
            raise DataError(f"tokenizer {name}: no end-of-document token ({self.EOS} or </s>)")
        self.eos_id = eos

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def token_bytes(self) -> torch.Tensor:
        """(V,) UTF-8 bytes per token. A byte-level BPE token is a string of byte symbols (one character per
        byte), so its length is exact even for a partial UTF-8 sequence, which decodes to U+FFFD."""
        from tokenizers import pre_tokenizers

        out = torch.zeros(self.vocab_size, dtype=torch.long)
        byte_level = isinstance(self.tok.pre_tokenizer, pre_tokenizers.ByteLevel)
        added = set(self.tok.get_added_tokens_decoder())  # special/added tokens are stored as text, not byte symbols
        for i in range(self.vocab_size):
            if i == self.eos_id:
                continue
            piece = self.tok.id_to_token(i)
            if byte_level and piece is not None and i not in added:
                out[i] = len(piece)
            else:
                out[i] = len(self.tok.decode([i]).encode("utf-8"))
        return out

    def save(self, directory: Path) -> None:
        with written_whole(Path(directory) / "tokenizer.json") as tmp:
            self.tok.save(str(tmp))


def get_tokenizer(spec: str, train_docs: list[tuple[str, str]] | None = None):
    """``byte``, ``bpe:VOCAB`` (trained on train_docs) or a path to a ``tokenizer.json``."""
    if spec == "byte":
        return ByteTokenizer()
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise DataError(f"tokenizer {spec!r} needs the tokenizers package: pip install 'minids[data]'") from None
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            raise DataError(f"tokenizer {spec!r}: write bpe:VOCAB with an integer vocabulary size") from None
        if vocab < 260:
            raise DataError(f"tokenizer {spec!r}: a byte-level BPE needs a vocabulary of at least 260")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=[HFTokenizer.EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator((t for _, t in train_docs or []), trainer=trainer)
        return HFTokenizer(tok, spec)
    p = Path(spec)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer {spec!r}: not 'byte', 'bpe:VOCAB' or an existing tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise DataError(f"{p}: not a readable tokenizer.json ({str(e).splitlines()[0][:160]})") from None
    return HFTokenizer(tok, str(p))


def load_saved_tokenizer(directory: str | Path):
    """The tokenizer a training run saved (``tokenizer_minids.json`` for bytes, else ``tokenizer.json``)."""
    d = Path(directory)
    if (d / "tokenizer_minids.json").is_file():
        return ByteTokenizer()
    if (d / "tokenizer.json").is_file():
        return get_tokenizer(str(d / "tokenizer.json"))
    return None


@dataclass
class TokenData:
    """The tokenised train and validation streams. train / val: (T,) int32 token ids."""

    train: torch.Tensor
    val: torch.Tensor
    token_bytes: torch.Tensor  # (V,) bytes per token id, for bits per byte

    @classmethod
    def build(cls, train_docs, val_docs, tokenizer) -> TokenData:
        def stream(docs):
            ids: list[int] = []
            for _, text in docs:
                ids.extend(tokenizer.encode(text))
                ids.append(tokenizer.eos_id)
            return torch.tensor(ids, dtype=torch.int32)

        return cls(stream(train_docs), stream(val_docs), tokenizer.token_bytes())

    def check(self, seq_len: int) -> None:
        for name, s in (("training", self.train), ("validation", self.val)):
            if len(s) < seq_len + 1:
                raise DataError(
                    f"the {name} split has {len(s)} tokens, fewer than one sequence of {seq_len}: "
                    "use more data or a shorter --seq_len"
                )

    def train_batch(self, batch: int, seq_len: int, seed: int, step: int, micro: int) -> torch.Tensor:
        """(B, S) windows at offsets drawn from a generator seeded by (seed, step, micro)."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)
        starts = torch.randint(0, len(self.train) - seq_len, (batch,), generator=g)
        idx = starts[:, None] + torch.arange(seq_len)[None, :]  # (B, S)
        return self.train[idx].long()

    def val_batches(self, batch: int, seq_len: int, max_tokens: int):
        """Consecutive (B, S) windows from the start of the validation stream, up to max_tokens."""
        n = min(len(self.val) // seq_len, max(1, max_tokens // seq_len))
        windows = self.val[: n * seq_len].view(n, seq_len).long()  # (n, S)
        for i in range(0, n, batch):
            yield windows[i : i + batch]

    def bits_per_byte(self, loss_sum: float, targets: torch.Tensor) -> float:
        """Summed cross-entropy (nats) over ``targets`` -> bits per UTF-8 byte."""
        nbytes = self.token_bytes[targets.flatten()].sum().item()
        return loss_sum / (math.log(2) * max(nbytes, 1))

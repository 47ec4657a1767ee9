"""Tokenizer tests: token ids and pieces compared with llama.cpp (through llama-cpp-python).

Vocabularies: SmolLM2's byte-level BPE (`smollm`), the same vocabulary re-labelled with other
`tokenizer.ggml.pre` values in weightless GGUF files, and SentencePiece vocabularies (BPE and
unigram) trained here on generated text. Nothing is downloaded.
"""

from __future__ import annotations

import ctypes
import dataclasses
import random
import re

import numpy as np
import pytest

from ntransformer_jax.errors import InputError, ModelFileError
from ntransformer_jax.tokenizer import Tokenizer

import tokenizer_fixtures as fx

llama_cpp = pytest.importorskip("llama_cpp", reason="the test extra installs llama-cpp-python")

# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------

CORPUS = [
    "Hello world! This is a simple sentence.",
    "The quick brown fox jumps over the lazy dog. THE END.",
    'def add(a, b):\n    """Add two numbers."""\n    return a + b\n\n\nclass Foo:\n\tpass\n',
    "for (int i = 0; i < n; ++i) {\n        x[i] = y[i] * 2;  // scale\n}",
    "Numbers: 1234567 and 3.14159, -42, 1e-9, 0x1F, 2024-06-01, 10,000,000.",
    "Whitespace   runs\t\ttabs\n\n\nnewlines   and trailing spaces   ",
    "\n\n\n",
    " ",
    "  ",
    "\t",
    "",
    "a",
    "   leading spaces",
    "line one\r\nline two\r\n",
    "café naïve résumé Ünïcödé straße",
    "e\u0301 combining accent",
    "日本語の文章です。中文文本，한국어 문장.",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flags 🇯🇵🇫🇷 heart ❤️ keycap 1️⃣",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "stray <|im_ prefix and <|im_end without a close",
    "<|endoftext|>",
    "text<|im_end|>more<|im_end|><|im_end|>",
    " <|im_start|> spaced <|im_end|> ",
    "don't I'LL we'Re they've she'd it's O'Neil 'quoted'",
    "mixed CASE and camelCaseWords, snake_case_words, ALLCAPS123",
    "symbols: @#$%^&*()[]{}<>|\\/~`=+-_;:'\",.?!",
    "<s>hello</s> <unk> <0x41> \u2581literal",
    "a" * 120,
    "🇯🇵" * 3 + "日本" * 5,
    "1 22 333 4444 55555 666666",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
]

# Characters a fuzz string is drawn from (all assigned in Unicode 14, see the module notes of
# ntransformer_jax.tokenizer about newer characters).
_FUZZ_POOL = (list(" \t\n\r\x0b\x0c\x85\xa0\u2000\u2028\u3000\u200b\u200d\ufeff")
              + list("abcXYZ'sStTdDlLmM0123456789.,;:!?\"#$%&()*+-/<=>@[\\]^_`{|}~")
              + list("éÉßçñøµª²½Ǆʰ\u0301Α\u0436\u05d0\u0628\u0915\u093f日本語の한국ー々〇Ⅻ①０ＡＺ！😀👍🏽🇯🇵")
              + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "'ll", "don't", "  ", "\n\n",
                 " world", "1234567", "<s>", "</s>"])


def _fuzz_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_FUZZ_POOL) for _ in range(rng.randint(1, 24))) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Vocabularies: each case is metadata for `Tokenizer.from_metadata` plus a GGUF for llama.cpp
# --------------------------------------------------------------------------------------------

# One `tokenizer.ggml.pre` value per distinct pre-tokenizer of ntransformer_jax.tokenizer.
PRE_VALUES = ["default", "gpt-2", "llama-bpe", "dbrx", "qwen2", "qwen35", "deepseek-llm",
              "deepseek-coder", "deepseek-v3", "falcon", "starcoder", "refact", "command-r", "tekken",
              "gpt-4o", "bloom", "viking", "chatglm-bpe", "glm4", "seed-coder", "bailingmoe",
              "minicpm5"]
CASES = ["smollm2", *(f"pre:{p}" for p in PRE_VALUES), "spm-bpe", "spm-unigram"]
# Cases whose token pieces / special ids differ (the pre-tokenizer does not change them).
VOCAB_CASES = ["smollm2", "pre:llama-bpe", "spm-bpe", "spm-unigram"]


@dataclasses.dataclass
class Case:
    """A vocabulary under test, as our tokenizer and as llama.cpp."""

    metadata: dict
    tokenizer: Tokenizer
    llama: object  # llama_cpp.Llama, kept alive for `vocab`
    vocab: object  # llama.cpp's `llama_vocab *`

    def llama_ids(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def llama_piece(self, token_id: int) -> bytes:
        buf = ctypes.create_string_buffer(1024)
        n = llama_cpp.llama_token_to_piece(self.vocab, token_id, buf, len(buf), 0, True)
        assert 0 <= n <= len(buf)
        return buf.raw[:n]


@pytest.fixture(scope="module")
def smollm2_metadata(smollm_path) -> dict:
    return {"path": smollm_path, "metadata": fx.tokenizer_metadata(smollm_path)}


@pytest.fixture(scope="module")
def case_cache(tmp_path_factory, smollm2_metadata) -> dict:
    return {"dir": tmp_path_factory.mktemp("vocab"), "source": smollm2_metadata}


def _load_llama(path: str):
    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


def _build_case(name: str, cache: dict) -> Case:
    out_dir = cache["dir"]
    if name == "smollm2":
        metadata, path = cache["source"]["metadata"], cache["source"]["path"]
    elif name.startswith("pre:"):
        metadata = dict(cache["source"]["metadata"])
        metadata["tokenizer.ggml.pre"] = name[4:]
        path = fx.write_vocab_gguf(out_dir / f"{name[4:]}.gguf", metadata)
    elif name.startswith("spm-"):
        pytest.importorskip("sentencepiece")
        model_type = name[4:]
        # Unigram training on this small corpus supports fewer pieces than BPE.
        size = 2000 if model_type == "bpe" else 700
        metadata = fx.train_sentencepiece(str(out_dir / f"spm_{model_type}"), fx.training_lines(),
                                          model_type=model_type, vocab_size=size)
        path = fx.write_vocab_gguf(out_dir / f"spm_{model_type}.gguf", metadata)
    else:
        raise ValueError(name)
    llama = _load_llama(path)
    return Case(metadata=metadata, tokenizer=Tokenizer.from_metadata(metadata), llama=llama,
                vocab=llama_cpp.llama_model_get_vocab(llama.model))


@pytest.fixture
def case(request, case_cache) -> Case:
    name = request.param
    if name not in case_cache:
        case_cache[name] = _build_case(name, case_cache)
    return case_cache[name]


def _mismatches(case: Case, texts: list[str]) -> list[str]:
    bad = []
    for text in texts:
        for add_special in (True, False):
            for parse_special in (True, False):
                ours = case.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)
                theirs = case.llama_ids(text, add_special, parse_special)
                if ours != theirs:
                    bad.append(f"{text!r} add_special={add_special} parse_special={parse_special}: "
                               f"ours={ours} llama.cpp={theirs}")
    return bad


# --------------------------------------------------------------------------------------------
# Token ids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_encode_matches_llama_cpp(case):
    texts = CORPUS + fx.training_lines(40, seed=7)
    bad = _mismatches(case, texts)
    assert not bad, f"{len(bad)} mismatches, first: " + "\n".join(bad[:5])


@pytest.mark.parametrize("case", ["smollm2", "pre:llama-bpe", "pre:qwen2", "pre:gpt-4o", "spm-bpe",
                                  "spm-unigram"], indirect=True)
def test_encode_matches_llama_cpp_on_random_text(case):
    bad = _mismatches(case, _fuzz_texts(300, seed=1))
    assert not bad, f"{len(bad)} mismatches, first: " + "\n".join(bad[:5])


def test_smollm2_known_ids(case_cache):
    """A few ids spelled out, so that a failure is easy to read (SmolLM2, pre `smollm`)."""
    tok = Tokenizer.from_metadata(case_cache["source"]["metadata"])
    assert tok.kind == "gpt2" and tok.pre == "smollm"
    assert tok.encode("<|im_start|>user\n") == [1, 4093, 198]
    assert tok.encode("<|im_start|>", parse_special=False) != [1]
    # smollm splits every digit.
    digits = tok.encode("1234567")
    assert len(digits) == 7 and tok.decode(digits) == "1234567"


# --------------------------------------------------------------------------------------------
# Pieces, decoding, special ids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", VOCAB_CASES, indirect=True)
def test_token_bytes_match_llama_cpp_for_every_token(case):
    tok = case.tokenizer
    bad = [i for i in range(tok.n_vocab) if tok.token_bytes(i) != case.llama_piece(i)]
    examples = [(i, tok.token_bytes(i), case.llama_piece(i)) for i in bad[:5]]
    assert not bad, f"{len(bad)} tokens differ, e.g. {examples}"


@pytest.mark.parametrize("case", VOCAB_CASES, indirect=True)
def test_special_ids_match_llama_cpp(case):
    tok, vocab = case.tokenizer, case.vocab
    assert tok.n_vocab == llama_cpp.llama_vocab_n_tokens(vocab)
    assert (tok.bos_id if tok.bos_id is not None else -1) == llama_cpp.llama_vocab_bos(vocab)
    assert (tok.eos_id if tok.eos_id is not None else -1) == llama_cpp.llama_vocab_eos(vocab)
    assert tok.add_bos == bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    assert tok.add_eos == bool(llama_cpp.llama_vocab_get_add_eos(vocab))
    theirs = frozenset(i for i in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i))
    assert tok.eog_ids == theirs
    assert all(tok.is_eog(i) for i in theirs)


@pytest.mark.parametrize("case", VOCAB_CASES, indirect=True)
def test_detokenize_pieces_match_llama_cpp_on_corpus(case):
    tok = case.tokenizer
    for text in CORPUS:
        ids = tok.encode(text, add_special=False)
        ours = [tok.token_bytes(i) for i in ids]
        assert ours == [case.llama_piece(i) for i in ids], text
        # llama-cpp-python's own `detokenize`, one token at a time (its buffer holds 32 bytes; it
        # drops a leading space after BOS, so BOS itself is skipped).
        for i in set(ids) - {tok.bos_id}:
            if len(tok.token_bytes(i)) <= 32:
                assert case.llama.detokenize([i], special=True) == tok.token_bytes(i), (text, i)


@pytest.mark.parametrize("case", ["smollm2", "pre:llama-bpe", "spm-bpe", "spm-unigram"], indirect=True)
def test_decode_round_trips(case):
    tok = case.tokenizer
    for text in CORPUS:
        if tok.kind == "llama" and "\u2581" in text:
            continue  # SentencePiece's visible space '▁' is a space once tokenized
        for add_special in (True, False):
            for parse_special in (True, False):
                if (not add_special and parse_special and tok.add_bos
                        and text.startswith(tok.token_bytes(tok.bos_id).decode())):
                    continue  # a leading BOS typed in the text is indistinguishable from an added one
                ids = tok.encode(text, add_special=add_special, parse_special=parse_special)
                assert tok.decode(ids) == text, (text, add_special, parse_special, ids)


@pytest.mark.parametrize("case", ["smollm2", "spm-bpe"], indirect=True)
def test_multibyte_character_split_across_tokens(case):
    """Characters spelled as several byte tokens: the pieces are partial UTF-8, their concatenation
    is the character's bytes, and decoding a partial prefix gives a replacement character."""
    tok = case.tokenizer
    split = 0
    for char in ["😀", "👨\u200d👩\u200d👧", "🇯🇵", "語", "한", "ж"]:
        ids = tok.encode(char, add_special=False)
        pieces = [tok.token_bytes(i) for i in ids]
        partial = [k for k, p in enumerate(pieces) if _incomplete_utf8(p)]
        if not partial:
            continue
        split += 1
        first, last = partial[0], partial[-1]
        assert b"".join(pieces[first:last + 1]) in char.encode("utf-8")
        assert b"".join(pieces).lstrip(b" ") == char.encode("utf-8")
        assert tok.decode(ids) == char
        assert "\ufffd" in tok.decode(ids[:first + 1])
    assert split, "expected at least one character to be spelled over several tokens"


def _incomplete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# --------------------------------------------------------------------------------------------
# Metadata variants and errors
# --------------------------------------------------------------------------------------------


def _variant(base: dict, **changes) -> dict:
    metadata = dict(base)
    for key, value in changes.items():
        key = "tokenizer.ggml." + key
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    return metadata


def test_metadata_variants_match_llama_cpp(case_cache):
    """Defaults and special-token rules that depend on metadata: BOS/EOS keys, add flags, token
    types, EOT key, and the Phi-3 rule (special tokens swallow the spaces after them)."""
    base = case_cache["source"]["metadata"]
    types = np.asarray(base["tokenizer.ggml.token_type"]).copy()
    types[1] = types[2] = 4  # <|im_start|>, <|im_end|> as user-defined: parsed even without special
    tokens = list(base["tokenizer.ggml.tokens"])
    tokens[5:8] = ["</s>", "<unk>", "<s>"]  # Phi-3 rules need these texts
    variants = {
        "no_bos_eos_keys": (_variant(base, bos_token_id=None, eos_token_id=None, add_bos_token=True,
                                     add_eos_token=True), None),
        "add_both_eot": (_variant(base, add_bos_token=True, add_eos_token=True, eot_token_id=5), None),
        "user_defined": (_variant(base, token_type=types), None),
        "no_pre": (_variant(base, pre=None), None),
        "llama3_default_add_bos": (_variant(base, pre="llama-bpe", add_bos_token=None), None),
        "phi3": (_variant(base, tokens=tokens), "Phi-3 mini instruct"),
    }
    texts = CORPUS + ["</s>  x <s>  y <unk>  z", "<|im_end|>   \n q", "a<reponame> b"]
    for name, (metadata, general_name) in variants.items():
        path = fx.write_vocab_gguf(case_cache["dir"] / f"variant_{name}.gguf", metadata,
                                   general_name=general_name)
        if general_name:
            metadata = {**metadata, "general.name": general_name}
        llama = _load_llama(path)
        case = Case(metadata, Tokenizer.from_metadata(metadata), llama,
                    llama_cpp.llama_model_get_vocab(llama.model))
        bad = _mismatches(case, texts)
        assert not bad, f"{name}: {len(bad)} mismatches, first: " + "\n".join(bad[:3])
        eog = frozenset(i for i in range(case.tokenizer.n_vocab)
                        if llama_cpp.llama_vocab_is_eog(case.vocab, i))
        assert case.tokenizer.eog_ids == eog, name
        assert case.tokenizer.bos_id == llama_cpp.llama_vocab_bos(case.vocab), name


@pytest.mark.parametrize("case", ["spm-bpe"], indirect=True)
def test_sentencepiece_variants_match_llama_cpp(case, case_cache):
    """SentencePiece flags: no space prefix (as Gemma files set it), EOS instead of BOS."""
    variants = {
        "no_space_prefix": _variant(case.metadata, add_space_prefix=False),
        "eos_not_bos": _variant(case.metadata, add_bos_token=False, add_eos_token=True),
    }
    for name, metadata in variants.items():
        llama = _load_llama(fx.write_vocab_gguf(case_cache["dir"] / f"spm_{name}.gguf", metadata))
        variant = Case(metadata, Tokenizer.from_metadata(metadata), llama,
                       llama_cpp.llama_model_get_vocab(llama.model))
        bad = _mismatches(variant, CORPUS + _fuzz_texts(100, seed=3))
        assert not bad, f"{name}: {len(bad)} mismatches, first: " + "\n".join(bad[:3])


def test_smollm2_attributes(case_cache):
    tok = Tokenizer.from_metadata(case_cache["source"]["metadata"])
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (49152, 1, 2, False, False)
    # <|endoftext|>, <|im_end|> by text; <reponame> as llama.cpp's auto-detected FIM repo token.
    assert tok.eog_ids == frozenset({0, 2, 4})
    assert tok.is_eog(2) and not tok.is_eog(1)
    assert tok.token_bytes(1) == b"<|im_start|>"
    with pytest.raises(InputError, match="token_id=49152"):
        tok.token_bytes(49152)


@pytest.mark.parametrize("change, pattern", [
    ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model='bert'"),
    ({"tokenizer.ggml.pre": "gpt2"}, "tokenizer.ggml.pre='gpt2'"),  # llama.cpp rejects it too
    ({"tokenizer.ggml.pre": "kimi-k2"}, "tokenizer.ggml.pre='kimi-k2'"),
    ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.token_type": np.zeros(3, np.int32)}, "tokenizer.ggml.token_type"),
])
def test_bad_metadata_raises(case_cache, change, pattern):
    metadata = dict(case_cache["source"]["metadata"])
    for key, value in change.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    with pytest.raises(ModelFileError, match=re.escape(pattern)) as info:
        Tokenizer.from_metadata(metadata)
    assert "\n" not in str(info.value)

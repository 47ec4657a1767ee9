"""Tokenizer built from GGUF metadata that reproduces llama.cpp's `llama_tokenize` token for token.

Two vocabulary kinds are supported, named by `tokenizer.ggml.model`:

* `gpt2`: byte-level BPE (tokens + merges). The text is split by the pre-tokenizer regexes that
  llama.cpp applies for `tokenizer.ggml.pre`, mapped to GPT-2's byte alphabet, and merged by the
  `tokenizers` library's BPE model with the merges in file order.
* `llama`: a SentencePiece vocabulary (tokens, scores, token types). llama.cpp tokenizes it by
  repeatedly merging the adjacent pair whose concatenation is the vocabulary piece with the
  highest score, then spells whatever is left over as `<0xXX>` byte tokens. That is a BPE whose
  merge ranks are the pieces ordered by score, so the merges are derived from the scores and the
  `tokenizers` BPE model (with byte fallback) runs them.

Special tokens (CONTROL, USER_DEFINED and UNKNOWN token types) are cut out of the text first, longest
first, exactly as llama.cpp's `tokenizer_st_partition` does; the text between them is then encoded.

Known differences from llama.cpp (none shows on text made of characters assigned in Unicode 14,
for any supported `tokenizer.ggml.pre`, in the differential tests):
* Unicode tables: the regexes run on Oniguruma, whose tables (Unicode 16) are newer than llama.cpp's.
  Characters assigned since (e.g. U+1C89, U+13460..U+143FF) are letters or symbols here but
  unassigned there, so text containing them may split differently.
* SentencePiece vocabularies in which two *different* pieces have exactly the same score and compete
  for overlapping characters: llama.cpp merges the leftmost pair first, here the lower token id wins.
* A character that is not itself a token: llama.cpp keeps it as a symbol that a merge may still
  absorb; here it never merges (gpt2 kind: it is dropped, llama kind: spelled as byte tokens).
  Real vocabularies hold every character their longer tokens are made of.
* Merges whose halves or result are not tokens are dropped (llama.cpp would merge, then drop the
  unknown result or spell it as bytes).
"""

from __future__ import annotations

import codecs
import dataclasses
import enum
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers

from ntransformer_jax.errors import InputError, ModelFileError

# ---------------------------------------------------------------------------------------------
# Metadata keys (GGUF spec, `tokenizer.*` namespace)
# ---------------------------------------------------------------------------------------------

KEY_MODEL = "tokenizer.ggml.model"
KEY_PRE = "tokenizer.ggml.pre"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_TOKEN_TYPE = "tokenizer.ggml.token_type"
KEY_SCORES = "tokenizer.ggml.scores"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_BOS_ID = "tokenizer.ggml.bos_token_id"
KEY_EOS_ID = "tokenizer.ggml.eos_token_id"
KEY_EOT_ID = "tokenizer.ggml.eot_token_id"
KEY_EOM_ID = "tokenizer.ggml.eom_token_id"
KEY_UNK_ID = "tokenizer.ggml.unknown_token_id"
KEY_FIM_PAD_ID = "tokenizer.ggml.fim_pad_token_id"
KEY_FIM_REP_ID = "tokenizer.ggml.fim_rep_token_id"
KEY_FIM_SEP_ID = "tokenizer.ggml.fim_sep_token_id"
KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
KEY_ADD_EOS = "tokenizer.ggml.add_eos_token"
KEY_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
KEY_GENERAL_NAME = "general.name"


class TokenType(enum.IntEnum):
    """Values of `tokenizer.ggml.token_type` (same numbering as SentencePiece's piece types)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class _Attr(enum.IntFlag):
    """llama.cpp's per-token attributes (`llama_token_attr`), derived from the token types."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8


_ATTR_OF_TYPE = {
    TokenType.UNKNOWN: _Attr.UNKNOWN,
    TokenType.UNUSED: _Attr.UNUSED,
    TokenType.NORMAL: _Attr.NORMAL,
    TokenType.CONTROL: _Attr.CONTROL,
    TokenType.USER_DEFINED: _Attr.USER_DEFINED,
    TokenType.BYTE: _Attr.BYTE,
}
# Special tokens: cut out of the text before encoding, and rendered as their raw text.
_SPECIAL_ATTRS = _Attr.CONTROL | _Attr.USER_DEFINED | _Attr.UNKNOWN

# Token texts llama.cpp recognises by name (llama-vocab.cpp, `load`): end of generation, and the
# fill-in-the-middle tokens that also end generation when no metadata key names them.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})
_EOT_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
})
_EOM_TEXTS = frozenset({"<|eom_id|>"})
_FIM_PAD_TEXTS = frozenset({"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"})
_FIM_REP_TEXTS = frozenset({"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"})
_FIM_SEP_TEXTS = frozenset({"<|file_sep|>"})
# gpt-oss: llama.cpp always renders these as user-defined text.
_FORCED_USER_DEFINED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})

_C_SPACE = " \t\n\v\f\r"  # C `isspace` in the "C" locale: what llama.cpp's lstrip/rstrip remove
# Stands for a character missing from a byte-level vocabulary. llama.cpp keeps such a character as
# a symbol that no merge touches and drops it at the end; `tokenizers` would drop it before merging
# (joining its neighbours), so it is mapped to this unknown token instead and removed afterwards.
# U+FFFF never occurs in GPT-2's byte alphabet, so no text can produce it.
_MISSING_CHAR = "\uffff<missing>"
_SPM_SPACE = "\u2581"  # SentencePiece's visible space '▁'

# ---------------------------------------------------------------------------------------------
# Pre-tokenizers: the regexes llama.cpp applies per `tokenizer.ggml.pre` (llama-vocab.cpp,
# `llm_tokenizer_bpe`). Each regex splits every piece left by the previous one; matches and the
# text between matches both become pieces (the `isolated` split behaviour).
# ---------------------------------------------------------------------------------------------


_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_RE_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's rewrite of the upper/lower-case classes (it cannot test case outside ASCII).
_UPPER = r"((?=[\p{L}])([^a-z]))"
_LOWER = r"((?=[\p{L}])([^A-Z]))"
_RE_TEKKEN = (r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+|[^\\r\\n\\p{L}\\p{N}]?" + _UPPER
              + "+" + _LOWER + r"*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_GPT4O = (r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+" + _CONTRACTIONS
             + "?|[^\\r\\n\\p{L}\\p{N}]?" + _UPPER + "+" + _LOWER + "*" + _CONTRACTIONS
             + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_DEEPSEEK3 = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                 r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
# llama.cpp matches regexes without \p{..} on a copy of the text in which every non-ASCII space is
# U+000B, so its literal ranges never match those spaces: "&&\S" (Oniguruma class intersection)
# and the U+3000 cut below reproduce that.
_RE_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff&&\\S]+"
_RE_DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+")
_RE_DEEPSEEK_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002]+"
_RE_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"


@dataclasses.dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp pre-tokenizes one family of `tokenizer.ggml.pre` values.

    Attributes:
      regexes: applied in order, each splitting the pieces of the previous one.
      ignore_merges: a piece that is already a whole vocabulary token is emitted without merging.
      add_bos: default for `add_bos` when `tokenizer.ggml.add_bos_token` is absent.
      no_bos: llama.cpp clears the default BOS id for this family.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False
    no_bos: bool = False


_PRE_DEFAULT = _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_PRE_GPT2 = _PreTokenizer((_RE_GPT2,))
_PRE_STARCODER = _PreTokenizer((r"\p{N}", _RE_GPT2))
_PRE_LLAMA3 = _PreTokenizer((_RE_LLAMA3,), ignore_merges=True, add_bos=True)
_PRE_QWEN2 = _PreTokenizer((_RE_QWEN2,))
_PRE_DEEPSEEK3 = _PreTokenizer((r"\p{N}{1,3}", _RE_CJK_KANA, _RE_DEEPSEEK3))

_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PRE_DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"), _PRE_LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer((_RE_LLAMA3,))),
    "deepseek-llm": _PreTokenizer((r"[\r\n]", _RE_DEEPSEEK_LETTERS, _RE_DEEPSEEK_PUNCT, r"\s+\z",
                                   _RE_CJK_HANGUL, r"\p{N}+")),
    "deepseek-coder": _PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _RE_CJK_HANGUL, r"\p{N}")),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _PRE_DEEPSEEK3),
    "falcon": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, "[0-9][0-9][0-9]")),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
                     "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion",
                     "granite-docling", "exaone4"), _PRE_GPT2),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                     "minerva-7b", "mellum2"), _PRE_STARCODER),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2",
                     "hunyuan", "solar-open", "grok-2"), _PRE_QWEN2),
    "qwen35": _PreTokenizer((_RE_QWEN35,)),
    "tekken": _PreTokenizer((_RE_TEKKEN,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"),
                    _PreTokenizer((_RE_GPT4O,))),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), _PreTokenizer((_RE_BLOOM,))),
    "viking": _PreTokenizer((_RE_BLOOM, r"\p{N}")),
    "chatglm-bpe": _PreTokenizer((_RE_LLAMA3,), no_bos=True),
    **dict.fromkeys(("glm4", "glm5"), _PreTokenizer((_RE_LLAMA3,), ignore_merges=True, no_bos=True)),
    "seed-coder": _PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
                                 r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), _PreTokenizer((
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",))),
    "minicpm5": _PreTokenizer((r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                              ignore_merges=True),
}


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _gpt2_byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}

# ---------------------------------------------------------------------------------------------
# Reading the metadata
# ---------------------------------------------------------------------------------------------


def _byte_token_value(text: str) -> int:
    """The byte a BYTE-type token like <0x0A> stands for."""
    if not re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
        raise ModelFileError(f"byte token {text[:20]!r} is not of the form <0xHH>")
    return int(text[3:5], 16)


def _optional_id(metadata: Mapping[str, Any], key: str, n_vocab: int, default: int | None) -> int | None:
    """A token id key; llama.cpp keeps the default when the key is absent or out of range."""
    if default is not None and not 0 <= default < n_vocab:
        default = None
    value = metadata.get(key)
    if value is None:
        return default
    try:
        value = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ModelFileError(f"{key}={str(value)[:40]} is not a token id") from None
    return value if 0 <= value < n_vocab else default


def _optional_bool(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    value = metadata.get(key)
    if value is None:
        return default
    if not isinstance(value, (bool, np.bool_, int, np.integer)):
        raise ModelFileError(f"{key}={value!r} is not a boolean")
    return bool(value)


def _array(metadata: Mapping[str, Any], key: str, n: int, dtype: type) -> np.ndarray | None:
    value = metadata.get(key)
    if value is None:
        return None
    array = np.asarray(value)
    if array.ndim != 1 or array.shape[0] < n or not np.issubdtype(array.dtype, np.number):
        raise ModelFileError(f"{key} must be a numeric array of at least {n} entries")
    return array[:n].astype(dtype)


def _token_attrs(token_types: np.ndarray | None, n_vocab: int) -> list[_Attr]:
    if token_types is None:
        return [_Attr.NORMAL] * n_vocab
    attrs = []
    for t in token_types.tolist():
        try:
            attrs.append(_ATTR_OF_TYPE.get(TokenType(t), _Attr.UNDEFINED))
        except ValueError:
            attrs.append(_Attr.UNDEFINED)
    return attrs


def _spm_merges(texts: list[str], vocab: Mapping[str, int], scores: np.ndarray) -> list[tuple[str, str]]:
    """Merges equivalent to llama.cpp's score-driven SentencePiece tokenizer.

    llama.cpp merges the adjacent pair of symbols whose concatenation is a vocabulary piece with the
    highest score. Every split of a piece into two pieces is therefore a merge, ranked by the score
    of the piece it forms (ties: lower token id first).
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for token_id, text in enumerate(texts):
        if vocab.get(text) != token_id or len(text) < 2:
            continue  # a duplicate text resolves to its last id, as in llama.cpp's token_to_id
        score = float(scores[token_id])
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _bpe_merges(metadata: Mapping[str, Any], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` as pairs, split at the first space after the first character."""
    raw = metadata.get(KEY_MERGES)
    if raw is None:
        raise ModelFileError(f"missing {KEY_MERGES} for a gpt2 tokenizer")
    if not isinstance(raw, (list, tuple)) or not all(isinstance(m, str) for m in raw):
        raise ModelFileError(f"{KEY_MERGES} must be an array of strings")
    merges, seen = [], set()
    for merge in raw:
        cut = merge.find(" ", 1)
        if cut < 0:
            continue
        pair = (merge[:cut], merge[cut + 1:])
        # llama.cpp keeps the first rank of a repeated pair; a pair that cannot produce a token is
        # useless to the `tokenizers` model (and rejected by it).
        if pair in seen or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            continue
        seen.add(pair)
        merges.append(pair)
    return merges


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


def check_utf8(text: str, what: str) -> None:
    """InputError naming `what` if `text` holds lone surrogates (how Python decodes bytes that
    are not UTF-8 from a command line or stdin): no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid UTF-8 text (undecodable character at position "
                         f"{e.start})") from None


def _as_text(text) -> str:
    """`text` as a str to tokenize: str as is, bytes decoded as UTF-8; anything else, bytes that
    are not UTF-8, and str holding lone surrogates are an InputError."""
    if isinstance(text, (bytes, bytearray)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"text is not valid UTF-8 (byte {e.start})") from None
    if not isinstance(text, str):
        raise InputError(f"text to tokenize must be a string, not {type(text).__name__}")
    check_utf8(text, "text")
    return text


class Tokenizer:
    """GGUF tokenizer with llama.cpp's semantics; build it with `Tokenizer.from_metadata`.

    Attributes:
      n_vocab: number of tokens.
      bos_id, eos_id: beginning/end of sequence token ids (None when the vocabulary has none).
      kind: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
      pre: `tokenizer.ggml.pre` as written in the file (None when absent).
      add_bos, add_eos: whether `encode(add_special=True)` adds BOS / EOS.
      add_space_prefix: llama kind only: a space is put before the text and after special tokens.
      eog_ids: ids that end generation, as llama.cpp's `llama_vocab_is_eog` decides.
    """

    def __init__(self, *, kind: str, pre: str | None, texts: list[str], attrs: list[_Attr],
                 bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool,
                 add_space_prefix: bool, eog_ids: frozenset[int], model: tokenizers.Tokenizer):
        """Use `Tokenizer.from_metadata`; this constructor takes already validated parts."""
        self.kind = kind
        self.pre = pre
        self.n_vocab = len(texts)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.eog_ids = eog_ids
        self._texts = texts
        self._attrs = attrs
        self._model = model
        # llama.cpp cuts special tokens out longest (in bytes) first.
        specials = [i for i, a in enumerate(attrs) if a & _SPECIAL_ATTRS]
        self._specials = sorted(specials, key=lambda i: -len(texts[i].encode("utf-8")))
        self._pieces = [self._piece(i) for i in range(self.n_vocab)]

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Builds the tokenizer from GGUF key/value metadata (`metadata.read_metadata`).

        Args:
          metadata: the file's metadata; `tokenizer.*` keys are read, plus `general.name`.

        Returns:
          The tokenizer.

        Raises:
          ModelFileError: a required key is missing or malformed, or `tokenizer.ggml.model` /
            `tokenizer.ggml.pre` names a tokenizer this module does not implement.
        """
        model_name = metadata.get(KEY_MODEL)
        if model_name is None:
            raise ModelFileError(f"missing {KEY_MODEL}")
        if model_name not in ("gpt2", "llama"):
            raise ModelFileError(f"unsupported {KEY_MODEL}={model_name!r} (supported: 'gpt2', 'llama')")
        texts = metadata.get(KEY_TOKENS)
        if texts is None:
            raise ModelFileError(f"missing {KEY_TOKENS}")
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ModelFileError(f"{KEY_TOKENS} must be a non-empty array of strings")
        # llama.cpp renames empty token texts so that they can be looked up.
        texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(texts)]
        n_vocab = len(texts)
        attrs = _token_attrs(_array(metadata, KEY_TOKEN_TYPE, n_vocab, np.int64), n_vocab)
        vocab = {text: i for i, text in enumerate(texts)}  # last id wins, as in llama.cpp

        pre = metadata.get(KEY_PRE)
        if pre is not None and not isinstance(pre, str):
            raise ModelFileError(f"{KEY_PRE}={pre!r} is not a string")
        if model_name == "gpt2":
            spec = _PRE_TOKENIZERS.get(pre or "default")
            if spec is None:
                hint = " (llama.cpp rejects it too; GPT-2's is named 'gpt-2')" if pre == "gpt2" else ""
                raise ModelFileError(f"unsupported {KEY_PRE}={pre!r} for a gpt2 tokenizer{hint}")
            add_bos, add_space_prefix = spec.add_bos, False
            default_bos = None if spec.no_bos else 11
            default_eos = 11
            model = _byte_level_bpe(vocab, _bpe_merges(metadata, vocab), spec)
        else:
            scores = _array(metadata, KEY_SCORES, n_vocab, np.float32)
            if scores is None:
                scores = np.zeros((n_vocab,), np.float32)
            add_bos = True
            add_space_prefix = _optional_bool(metadata, KEY_ADD_SPACE_PREFIX, True)
            default_bos, default_eos = 1, 2
            unk_id = _optional_id(metadata, KEY_UNK_ID, n_vocab, 0)
            model = _sentencepiece_bpe(texts, vocab, scores, None if unk_id is None else texts[unk_id])

        bos_id = _optional_id(metadata, KEY_BOS_ID, n_vocab, default_bos)
        eos_id = _optional_id(metadata, KEY_EOS_ID, n_vocab, default_eos)
        add_bos = _optional_bool(metadata, KEY_ADD_BOS, add_bos)
        add_eos = _optional_bool(metadata, KEY_ADD_EOS, False)
        if add_bos and bos_id is None:
            raise ModelFileError(f"{KEY_ADD_BOS} is set but the vocabulary has no BOS token")
        if add_eos and eos_id is None:
            raise ModelFileError(f"{KEY_ADD_EOS} is set but the vocabulary has no EOS token")
        eog_ids = _end_of_generation(metadata, texts, attrs, eos_id)
        _apply_name_rules(metadata, texts, attrs, vocab)
        return cls(kind=model_name, pre=pre, texts=texts, attrs=attrs, bos_id=bos_id, eos_id=eos_id,
                   add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix,
                   eog_ids=eog_ids, model=model)

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, identical to llama.cpp's `llama_tokenize`.

        Args:
          text: the text to tokenize.
          add_special: add BOS (and EOS) as the vocabulary asks (`add_bos` / `add_eos`).
          parse_special: treat the text of control and unknown tokens as those tokens; when False
            they are plain text (user-defined tokens are always recognised, as in llama.cpp).

        Returns:
          The token ids.
        """
        text = _as_text(text)
        ids: list[int] = []
        if add_special and self.add_bos:
            ids.append(self.bos_id)
        after_special = True  # the llama kind prefixes a space to text that starts a fragment run
        for fragment in self._partition(text, parse_special):
            if isinstance(fragment, int):
                ids.append(fragment)
                after_special = True
                continue
            if self.kind == "llama":
                if self.add_space_prefix and after_special:
                    fragment = " " + fragment
                fragment = fragment.replace(" ", _SPM_SPACE)
            ids.extend(i for i in self._model.encode(fragment, add_special_tokens=False).ids
                       if i < self.n_vocab)
            after_special = False
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cuts special tokens out of `text` like llama.cpp's `tokenizer_st_partition`.

        Each special token, longest first, is searched left to right in every remaining text
        fragment; control and unknown tokens only when `parse_special`.
        """
        fragments: list[str | int] = [text] if text else []
        for token_id in self._specials:
            attr = self._attrs[token_id]
            if not parse_special and attr & (_Attr.CONTROL | _Attr.UNKNOWN):
                continue
            needle = self._texts[token_id]
            if not any(isinstance(f, str) and needle in f for f in fragments):
                continue
            split: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or needle not in fragment:
                    split.append(fragment)
                    continue
                start = 0
                while (hit := fragment.find(needle, start)) >= 0:
                    left = fragment[start:hit]
                    if attr & _Attr.LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        split.append(left)
                    split.append(token_id)
                    start = hit + len(needle)
                    if attr & _Attr.RSTRIP:
                        while start < len(fragment) and fragment[start] in _C_SPACE:
                            start += 1
                if start < len(fragment):
                    split.append(fragment[start:])
            fragments = split
        return fragments

    # -- decoding -------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token as llama.cpp's `llama_token_to_piece(special=True)` renders them.

        Control, user-defined and unknown tokens give their text, byte tokens `<0xXX>` their byte,
        normal tokens their text ('▁' -> ' ' for the llama kind, GPT-2 byte alphabet -> bytes for
        gpt2); unused and undefined tokens give nothing.

        Raises:
          InputError: `token_id` is not in [0, n_vocab).
        """
        if not 0 <= token_id < self.n_vocab:
            raise InputError(f"{token_id=} is outside the vocabulary [0, {self.n_vocab})")
        return self._pieces[token_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: the tokens' bytes joined, then UTF-8 decoded (errors="replace").

        Like llama.cpp's `llama_detokenize(remove_special=True)`, a leading BOS (when `add_bos`) and
        a trailing EOS (when `add_eos`) are dropped; other special tokens are rendered as their text.
        For the llama kind with `add_space_prefix`, the space that `encode` puts at the start of the
        text and after each special token is removed again. So `decode(encode(t)) == t`, except for
        text that itself starts with the BOS text (or ends with the EOS text) and for '▁' typed in
        text for the llama kind, which comes back as a space.

        Raises:
          InputError: an id is not in [0, n_vocab).
        """
        ids = list(ids)
        if self.add_bos and ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        out = bytearray()
        strip_space = self.kind == "llama" and self.add_space_prefix
        after_special = True
        for token_id in ids:
            piece = self.token_bytes(token_id)
            if self._attrs[token_id] & _SPECIAL_ATTRS:
                after_special = True
            elif piece:
                if strip_space and after_special and piece.startswith(b" "):
                    piece = piece[1:]
                after_special = False
            out += piece
        return out.decode("utf-8", errors="replace")

    def is_eog(self, token_id: int) -> bool:
        """Whether `token_id` ends generation (EOS, EOT, EOM, <|im_end|>, ...), as llama.cpp decides."""
        return token_id in self.eog_ids

    def _piece(self, token_id: int) -> bytes:
        """llama.cpp's `token_to_piece(special=True)` for one token."""
        text, attr = self._texts[token_id], self._attrs[token_id]
        if attr & _SPECIAL_ATTRS:
            return text.encode("utf-8")
        if attr & _Attr.NORMAL:
            if self.kind == "llama":
                return text.replace(_SPM_SPACE, " ").encode("utf-8")
            return _byte_level_decode(text)
        if attr & _Attr.BYTE:
            return bytes([_byte_token_value(text)])
        return b""

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos}, "
                f"add_eos={self.add_eos})")


# ---------------------------------------------------------------------------------------------
# Helpers for `from_metadata`
# ---------------------------------------------------------------------------------------------


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]],
                    spec: _PreTokenizer) -> tokenizers.Tokenizer:
    """The `tokenizers` pipeline for a gpt2-kind vocabulary: regex splits, byte alphabet, BPE.

    Characters missing from the vocabulary come out as id `len(vocab)` (see `_MISSING_CHAR`).
    """
    vocab = {**vocab, _MISSING_CHAR: len(vocab)}
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=_MISSING_CHAR, fuse_unk=False,
                     ignore_merges=spec.ignore_merges)
    model = tokenizers.Tokenizer(bpe)
    steps = [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in spec.regexes]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    model.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return model


def _sentencepiece_bpe(texts: list[str], vocab: dict[str, int], scores: np.ndarray,
                       unk: str | None) -> tokenizers.Tokenizer:
    """The `tokenizers` pipeline for a llama-kind vocabulary: one word, score-ranked merges."""
    bpe = models.BPE(vocab=vocab, merges=_spm_merges(texts, vocab, scores), unk_token=unk,
                     byte_fallback=True)
    return tokenizers.Tokenizer(bpe)


def _byte_level_decode(text: str) -> bytes:
    """GPT-2 byte alphabet -> bytes; llama.cpp spells a character outside it as below."""
    out = bytearray()
    for char in text:
        byte = _CHAR_TO_BYTE.get(char)
        if byte is None:
            out += b"[UNK_BYTE_0x" + char.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
        else:
            out.append(byte)
    return bytes(out)


def _end_of_generation(metadata: Mapping[str, Any], texts: list[str], attrs: list[_Attr],
                       eos_id: int | None) -> frozenset[int]:
    """The end-of-generation ids, following llama.cpp's rules (ids by key, then by token text).

    Tokens recognised by their text are also made CONTROL in `attrs`, as llama.cpp does.
    """
    n_vocab = len(texts)
    by_text = {text: i for i, text in enumerate(texts)}

    def detect(key: str, names: frozenset[str]) -> int | None:
        token_id = _optional_id(metadata, key, n_vocab, None)
        if token_id is None:  # llama.cpp takes any match; take the lowest id for determinism
            matches = sorted(by_text[t] for t in names if t in by_text)
            if matches:
                token_id = matches[0]
                attrs[token_id] |= _Attr.CONTROL
        return token_id

    eot_id = detect(KEY_EOT_ID, _EOT_TEXTS)
    eom_id = detect(KEY_EOM_ID, _EOM_TEXTS)
    fim_ids = [detect(KEY_FIM_PAD_ID, _FIM_PAD_TEXTS), detect(KEY_FIM_REP_ID, _FIM_REP_TEXTS),
               detect(KEY_FIM_SEP_ID, _FIM_SEP_TEXTS)]
    # llama.cpp marks control tokens containing "unused" as unused (they stay special).
    for i, text in enumerate(texts):
        if attrs[i] & _Attr.CONTROL and "unused" in text:
            attrs[i] |= _Attr.UNUSED
    eog = {i for i in fim_ids if i is not None}
    for text, i in by_text.items():
        if text in _EOG_TEXTS:
            eog.add(i)
            attrs[i] |= _Attr.CONTROL
    for text in _FORCED_USER_DEFINED:
        if text in by_text:
            attrs[by_text[text]] = _Attr.USER_DEFINED
    eog.update(i for i in (eos_id, eot_id, eom_id) if i is not None)
    # o200k_harmony / solar-open: "<|end|>" is not EOG when the return/call tokens exist.
    eog_texts = {texts[i] for i in eog}
    has_call = bool(eog_texts & {"<|call|>", "<|calls|>"})
    if "<|end|>" in eog_texts and has_call and eog_texts & {"<|return|>", "<|flush|>"}:
        end_id = next(i for i in eog if texts[i] == "<|end|>")
        eog.discard(end_id)
        attrs[end_id] = _Attr.USER_DEFINED
    # gemma4 / plamo: "</s>" is a normal token there.
    if "</s>" in eog_texts and eog_texts & {"<|tool_response>", "<|plamo:eos|>"}:
        s_id = next(i for i in eog if texts[i] == "</s>")
        eog.discard(s_id)
        attrs[s_id] = _Attr.NORMAL
    return frozenset(eog)


def _apply_name_rules(metadata: Mapping[str, Any], texts: list[str], attrs: list[_Attr],
                      vocab: Mapping[str, int]) -> None:
    """llama.cpp's per-model strip attributes, keyed by `general.name` (Phi-3 only here)."""
    name = str(metadata.get(KEY_GENERAL_NAME, "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return
    for i, attr in enumerate(attrs):
        if attr & _SPECIAL_ATTRS:
            attrs[i] |= _Attr.RSTRIP
    for text, strip in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
        if text in vocab:
            i = vocab[text]
            attrs[i] = attrs[i] | _Attr.RSTRIP if strip else attrs[i] & ~_Attr.RSTRIP


def decode_stream(tokens: Iterable[int], token_bytes: Callable[[int], bytes]) -> Iterator[str]:
    """Text pieces of `tokens` as they come, UTF-8 safe.

    A character whose bytes are split across tokens is yielded once, whole, when its last byte
    arrives; bytes that can never form a character become U+FFFD.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        piece = decoder.decode(token_bytes(token))
        if piece:
            yield piece
    rest = decoder.decode(b"", final=True)
    if rest:
        yield rest

"""Tokenizers: ids equal to the reference implementations, and clear errors.

Meta's llama_models package is the oracle for Llama 3 (tokenizer and chat
format); the sentencepiece library is the oracle for Llama 2 style models.
"""

import importlib.resources
import os
import random
import sysconfig
from pathlib import Path

import pytest

from llama.tokenizer import (
    TIKTOKEN_MAX_CHARS, TIKTOKEN_MAX_RUN, ByteTokenizer, Llama3Tokenizer, SentencePieceTokenizer,
    TokenizerFileError, load_tokenizer, split_for_tiktoken)

LLAMA3_MODEL = Path(str(importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"))
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer
    return Tokenizer(LLAMA3_MODEL)


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(LLAMA3_MODEL)


def varied_corpus() -> list[str]:
    """Prose, code, numbers, scripts, emoji, whitespace runs, huge inputs, special strings."""
    rng = random.Random(0)
    code_files = ["textwrap.py", "json/decoder.py", "difflib.py", "this.py"]
    sources = [(STDLIB / f).read_text(encoding="utf-8") for f in code_files]
    lines = [line for text in sources for line in text.splitlines(keepends=True)]
    prose = [
        "Hello world", "The quick brown fox jumps over the lazy dog.",
        "It's what we'd've done, but they'll say I'M WRONG and you're right.",
        "Llamas are domesticated South American camelids, used as meat and pack animals.",
        "naïve café résumé façade coöperate — “quoted” ‘text’ …",
    ]
    numbers = ["0", "7", "42", "123", "1234", "1234567890", "3.14159265", "-273.15", "1,000,000",
               "2024-05-01T12:34:56Z", "0x7fffffff", "1e-9", "١٢٣٤٥", "½ ¾ ⅞"]
    numbers += ["".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40))) for _ in range(40)]
    scripts = ["你好，世界！今天天气很好。", "日本語のテキストとカタカナ、ひらがな。", "한국어 문장입니다.",
               "Привет, мир!", "مرحبا بالعالم", "नमस्ते दुनिया", "Γειά σου Κόσμε", "שלום עולם",
               "ไทยภาษา", "e\u0301 combining, zero\u200bwidth, rtl\u200f mark", "mixed 中文 and English 123"]
    emoji = ["👋🌍", "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "👍🏽👍🏿 tones", "🤖💬🦙" * 20, "emoji😀in😀words"]
    whitespace = ["", " ", "  ", "\n", "\n\n\n", "\t\tx", "x   \n  y", "\r\n" * 7, " " * 100,
                  " " * TIKTOKEN_MAX_RUN, " " * (TIKTOKEN_MAX_RUN + 1), " " * 50_001, "\n" * 30_000,
                  "\t \n" * 12_000, "a" * 25_001, "ab" * 40_000 + " " * 30_000 + "tail"]
    words = " ".join(sources[0].split())
    megabyte_line = (words * (1_000_000 // len(words) + 1))[:1_000_000]  # one line, 1 MB
    specials = ["<|begin_of_text|>", "Hi<|eot_id|>there", "<|start_header_id|>user<|end_header_id|>",
                "<|reserved_special_token_5|>", "<|image|> <|python_tag|>", "<|not_a_special|>", "<|"]
    alphabet = [chr(c) for r in [(32, 127), (160, 900), (0x4E00, 0x4E80), (0x1F300, 0x1F340)]
                for c in range(*r)] + ["\n", "\t", " "] * 30
    random_strings = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(200)]
    return (sources + lines + prose + numbers + scripts + emoji + whitespace + [megabyte_line]
            + specials + random_strings)


def test_llama3_check_value_hello_world(llama3):
    assert llama3.encode("Hello world", bos=True) == [128000, 9906, 1917]
    assert llama3.encode("Hello world", True, True) == [128000, 9906, 1917, 128001]


def test_llama3_ids_match_meta_on_varied_corpus(llama3, meta):
    corpus = varied_corpus()
    for text in corpus:
        expected = meta.encode(text, bos=False, eos=False)
        assert llama3.encode(text) == expected, f"ids differ for {text[:80]!r}"
        assert llama3.decode(expected) == text
    flagged = corpus[:50]  # bos/eos framing on a subset
    for text in flagged:
        assert llama3.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)
    batch = [a.tolist() for a in llama3.encode_batch(corpus, bos=True, eos=True, num_threads=2)]
    assert batch == [[128000] + meta.encode(t, bos=False, eos=False) + [128001] for t in corpus]
    print(f"\ncompared {len(corpus)} strings with Meta's tokenizer "
          f"({sum(map(len, corpus)):,} characters), {len(flagged)} with bos/eos")


def test_llama3_special_strings_are_text_unless_allowed(llama3, meta):
    text = "A<|eot_id|>B <|begin_of_text|><|reserved_special_token_7|>"
    as_text = llama3.encode(text)
    assert as_text == meta.encode(text, bos=False, eos=False)
    assert not set(as_text) & set(llama3.special_tokens.values())
    assert llama3.encode(text, allowed_special="all") == meta.encode(
        text, bos=False, eos=False, allowed_special="all")
    only_eot = llama3.encode(text, allowed_special={"<|eot_id|>"})
    assert only_eot == meta.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"})
    assert only_eot.count(128009) == 1 and 128000 not in only_eot
    with pytest.raises(ValueError, match="unknown special"):
        llama3.encode(text, allowed_special={"<|nope|>"})


def test_llama3_special_token_table_matches_meta(llama3, meta):
    assert llama3.special_tokens == meta.special_tokens
    assert llama3.vocab_size == meta.n_words == 128256
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, 128004)
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (meta.bos_id, meta.eos_id, meta.pad_id)
    assert llama3.stop_tokens == meta.stop_tokens == [128001, 128008, 128009]
    named = {128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128010: "<|python_tag|>",
             128002: "<|reserved_special_token_0|>", 128255: "<|reserved_special_token_245|>"}
    assert {i: llama3.decode([i]) for i in named} == named


def test_long_inputs_are_cut_where_meta_cuts_them(meta):
    """Meta's own limits (from its module, not ours) and Meta's own splitter are the oracle."""
    from llama_models.llama3.tokenizer import MAX_NO_WHITESPACES_CHARS, TIKTOKEN_MAX_ENCODE_CHARS

    assert (TIKTOKEN_MAX_CHARS, TIKTOKEN_MAX_RUN) == (TIKTOKEN_MAX_ENCODE_CHARS, MAX_NO_WHITESPACES_CHARS)

    def meta_pieces(s):
        return [piece for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS)
                for piece in meta._split_whitespaces_or_nonwhitespaces(s[i:i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                                       MAX_NO_WHITESPACES_CHARS)]
    cases = ["", "short text", "a" * 25_000, "a" * 25_001, "a" * 50_001, " " * 75_000 + "b" * 25_001,
             "x" * 399_990 + " " * 30_000 + "y" * 40_000, "word " * 100_000, "é\u3000" * 20_000 + "\u3000" * 26_000]
    for s in cases:
        assert split_for_tiktoken(s) == meta_pieces(s), f"cuts differ for {s[:20]!r}... ({len(s)} chars)"


def test_llama3_dialog_matches_meta_chat_format(llama3, meta):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat

    dialogs = [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "  What is 2+2?\n\n"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "你好 👋\nline two"}],
        [{"role": "user", "content": "please print <|eot_id|> and <|begin_of_text|> literally"}],
        [{"role": "user", "content": ""}],
    ]
    chat = ChatFormat(meta)
    for dialog in dialogs:
        # Meta's llama_models does not strip message content; the Llama 3 format does.
        reference = chat.encode_dialog_prompt(
            [RawMessage(role=m["role"], content=m["content"].strip()) for m in dialog]).tokens
        assert llama3.encode_dialog(dialog) == reference
    raw = [RawMessage(role="user", content="objects work too")]
    assert llama3.encode_dialog(raw) == chat.encode_dialog_prompt(raw).tokens
    assert llama3.decode(llama3.encode_dialog(dialogs[0])) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.fixture(scope="module")
def tiny_sentencepiece(tmp_path_factory):
    import sentencepiece
    tmp = tmp_path_factory.mktemp("sp")
    (tmp / "train.txt").write_text((STDLIB / "textwrap.py").read_text() + "Ünïcödé 你好 👋\n")
    with open(os.devnull, "w") as quiet:
        sentencepiece.SentencePieceTrainer.train(
            input=str(tmp / "train.txt"), model_prefix=str(tmp / "tokenizer"), vocab_size=400,
            logstream=quiet)
    return tmp / "tokenizer.model"


def test_sentencepiece_ids_match_the_library(tiny_sentencepiece):
    import sentencepiece
    reference = sentencepiece.SentencePieceProcessor(model_file=str(tiny_sentencepiece))
    tok = load_tokenizer(tiny_sentencepiece)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (400, 0, 1, 2, -1)
    assert tok.stop_tokens == [2] and tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    texts = ["Hello world", "def wrap(text, width=70):", "  indented\n\nlines", "Ünïcödé 你好 👋", ""]
    texts += (STDLIB / "textwrap.py").read_text().splitlines()[:200]
    for text in texts:
        ids = reference.encode(text)
        assert tok.encode(text) == ids
        assert tok.encode(text, bos=True, eos=True) == [1] + ids + [2]
        assert tok.decode(ids) == reference.decode(ids)
    assert [a.tolist() for a in tok.encode_batch(texts, bos=True)] == [[1] + reference.encode(t) for t in texts]
    assert load_tokenizer(tiny_sentencepiece.parent).fingerprint == tok.fingerprint  # directory form


def test_byte_tokenizer_needs_no_file():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and isinstance(load_tokenizer(None), ByteTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (264, 256, 257, 258)
    assert tok.vocab_size % 8 == 0
    assert tok.encode("hé", bos=True, eos=True) == [256, 104, 195, 169, 257]
    for text in ["", "plain ascii", "你好 👋🏽 naïve\n\t", "<|eot_id|> stays text"]:
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode_batch([text], bos=True)[0].tolist() == tok.encode(text, bos=True)
    assert tok.encode("a<|eot_id|>", allowed_special="all") == [97, 261]
    assert tok.encode_dialog([{"role": "user", "content": " hi "}]) == (
        [256, 259] + list(b"user") + [260] + list(b"\n\nhi") + [261, 259] + list(b"assistant") + [260, 10, 10])


def test_unknown_tokenizer_file_is_one_clear_error(tmp_path):
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"\x00\x01\x02 not a tokenizer")
    text = tmp_path / "notes.txt"
    text.write_text("just some words\nand more words\n")
    broken_sp = tmp_path / "tokenizer.model"
    broken_sp.write_bytes(b"\x0a\x05junk, not a ModelProto")
    bad_rank_line = tmp_path / "ranks.model"
    bad_rank_line.write_text("IQ== 0\nIg== 1\n" + "not base64 at all\n" * 3)
    for path in [garbage, text, broken_sp, tmp_path / "missing.model", tmp_path]:
        with pytest.raises(TokenizerFileError) as err:
            load_tokenizer(path)
        message = str(err.value)
        assert isinstance(err.value, ValueError) and "\n" not in message
        assert str(path) in message and "tiktoken" in message and "SentencePiece" in message
    with pytest.raises(TokenizerFileError, match=f"{bad_rank_line}:3: expected 'base64 rank'"):
        Llama3Tokenizer(bad_rank_line)

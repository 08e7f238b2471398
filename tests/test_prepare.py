"""`python -m llama.data prepare`: tokenizing ahead of training, in parallel, into the
very cache train.py opens; and the largest token id recorded in every cache."""

import importlib.resources
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama.data import chat_cache, files, token_cache
from llama.data.chat_cache import load_conversation_cache
from llama.data.cli import main, prepare
from llama.data.progress import Progress
from llama.data.token_cache import TokenCache, load_token_cache
from llama.tokenizer import ByteTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_MODEL = Path(str(importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"))
BYTES = ByteTokenizer()


def text_corpus(root: Path) -> list[str]:
    """Text files and a .jsonl file of many lines; returns the documents in cache order."""
    root.mkdir(parents=True)
    docs = [f"Document {i}: the quick brown fox jumps over {i * 7} lazy dogs. Ünïcödé ✓ 你好\n" * (1 + i % 5)
            for i in range(300)]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:250]))
    for i, d in enumerate(docs[250:]):
        (root / f"b{i:02d}.txt").write_text(d)
    return docs


def conversations(n: int) -> str:
    return "".join(json.dumps({"messages": [
        {"role": "system", "content": f"You are assistant number {i}."},
        {"role": "user", "content": f"What is {i} + {i}? Explain briefly, please."},
        {"role": "assistant", "content": f"{i} + {i} = {2 * i}, because adding a number to itself doubles it."},
    ]}) + "\n" for i in range(n))


def cache_bytes(cache) -> dict[str, bytes]:
    """Every file of one cache, by name."""
    stem = cache.path.name.removesuffix(".json")
    return {f.name: f.read_bytes() for f in cache.path.parent.glob(stem + ".*")}


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "llama.data", "prepare", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


# ---------------------------------------------------------------------------
# Parallel tokenization


def test_two_workers_write_the_same_cache_bytes_as_one(tmp_path, monkeypatch, capsys):
    docs = text_corpus(tmp_path / "data")
    monkeypatch.setattr(files, "PART_BYTES", 2_000)  # dozens of chunks, so both workers get several
    llama3 = load_tokenizer(LLAMA3_MODEL)  # reloaded from its path in each worker
    serial = prepare([tmp_path / "data"], llama3, tmp_path / "serial", workers=1)[0]
    parallel = prepare([tmp_path / "data"], llama3, tmp_path / "parallel", workers=2)[0]
    summaries = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenized ")]
    assert [s.split("tokens/s, ")[1].split(")")[0] for s in summaries] == ["1 worker", "2 workers"]

    assert cache_bytes(parallel) == cache_bytes(serial) and len(cache_bytes(serial)) == 3
    assert [parallel.document(i).tolist() for i in range(parallel.num_docs)] == [
        llama3.encode(d, bos=True, eos=True) for d in docs]


# ---------------------------------------------------------------------------
# train.py finds the prepared cache


def _build_data_without_a_tokenizer(*argvs) -> list[int]:
    """train.py's build_data for each argv with every encode refusing to run: a prepared cache must be opened,
    not built."""
    from llama.training.build import make_mesh
    from llama.training.flags import parse_args
    from llama.training.inputs import build_data
    from llama.tokenizer import Llama3Tokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("train.py tokenized data that prepare had already tokenized")

    for cls in (ByteTokenizer, Llama3Tokenizer):
        cls.encode = cls.encode_batch = refuse
    tokens = []
    for argv in argvs:
        opts = parse_args(argv)
        tokenizer = load_tokenizer(opts.tokenizer)
        built = build_data(opts, tokenizer, make_mesh(opts), 2, tokenizer.vocab_size)
        tokens.append(built.loader.dataset.num_tokens)
    return tokens


def test_train_py_after_prepare_tokenizes_nothing(tmp_path):
    from parallel.spawn import run_on_ranks

    (tmp_path / "train.txt").write_text("Training text. " * 400)
    (tmp_path / "val.txt").write_text("Held-out text. " * 200)
    (tmp_path / "chat.jsonl").write_text(conversations(40))
    text = ["--data", f"{tmp_path}/train.txt", "--val-data", f"{tmp_path}/val.txt", "--tokenizer", "bytes",
            "--cache-dir", f"{tmp_path}/cache"]
    chat_flags = ["--data", f"{tmp_path}/chat.jsonl", "--train-on", "last", "--cache-dir", f"{tmp_path}/cache"]
    assert main(["prepare", *text]) == 0 and main(["prepare", *chat_flags]) == 0

    text_tokens, chat_tokens = run_on_ranks(_build_data_without_a_tokenizer, 1, text + ["--seq-len", "32"],
                                            chat_flags + ["--seq-len", "256"])[0]
    assert text_tokens == len(BYTES.encode("Training text. " * 400)) + 2
    assert chat_tokens == len(load_conversation_cache(tmp_path / "chat.jsonl", BYTES, tmp_path / "cache",
                                                      train_on="last", quiet=True).tokens)


# ---------------------------------------------------------------------------
# The command line


def test_cli_prepares_chat_data_on_two_workers_with_progress_and_one_summary_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(conversations(5_000))  # ~1.3 MB: two chunks of PART_BYTES, so two workers
    result = run_cli("--data", path, "--cache-dir", tmp_path / "cli", "--workers", 2)
    assert result.returncode == 0, result.stderr
    serial = load_conversation_cache([path], BYTES, tmp_path / "serial", quiet=True)

    lines, mb = result.stderr.splitlines(), path.stat().st_size / 1e6
    assert lines[-2].startswith(f"encoding: 100% ({mb:.1f}/{mb:.1f} MB), 5,000 conversations, ")
    assert lines[-2].endswith("ETA 0:00")
    assert re.fullmatch(rf"encoded 1 files: 5,000 conversations, {len(serial.tokens):,} tokens in [\d.]+s "
                        rf"\([\d,]+ tokens/s, 2 workers\) -> {re.escape(str(tmp_path / 'cli'))}/\w+\.chat\.json",
                        lines[-1]), lines[-1]
    assert all(line.startswith("encoding: ") for line in lines[:-1]), lines
    prepared = load_conversation_cache([path], BYTES, tmp_path / "cli", quiet=True)
    assert prepared.hit and cache_bytes(prepared) == cache_bytes(serial)


def test_cli_bad_line_is_one_error_line_naming_file_line_and_fix_with_exit_code_2(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = conversations(5_000).splitlines()  # ~1.3 MB: the bad lines reach the parent from a worker
    lines[4_000], lines[4_500] = '{"messages": [{"role": "bot", "content": "hi"}]}', "{not json"
    path.write_text("\n".join(lines) + "\n")
    result = run_cli("--data", path, "--cache-dir", tmp_path / "cache", "--workers", 2)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: {path}:4001: message 1 has unknown role 'bot'; use one of system, user, "
                             "assistant, ipython, tool, or skip bad lines (--skip-bad-lines)\n")
    assert not list((tmp_path / "cache").iterdir())  # no partial cache left behind


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's errors
        return e.code


@pytest.mark.parametrize("flags, message", [
    (["--data", "missing.txt"], "missing.txt: no such data file or directory; check the path"),
    (["--tokenizer", "missing.model"], "tokenizer file not found: missing.model; accepted: 'bytes'"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
])
def test_missing_paths_and_bad_flags_are_one_error_line_with_exit_code_2(tmp_path, monkeypatch, capsys,
                                                                         flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("some text")
    assert exit_code(["prepare", "--data", "data.txt", "--cache-dir", "cache", *flags]) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error: " in line]
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert "Traceback" not in err and not (tmp_path / "cache").exists()


def test_help_gives_every_flag_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = capsys.readouterr().out.split("options:", 1)[1]
    entries = {e.split()[0].rstrip(","): " ".join(e.split()) for e in re.split(r"\n  (?=-)", text)[1:]}
    assert {"--data", "--tokenizer", "--cache-dir", "--data-format", "--train-on", "--skip-bad-lines",
            "--val-data", "--workers"} <= entries.keys()
    for flag, entry in entries.items():
        assert flag == "-h" or "(default: " in entry, entry


def test_progress_on_a_terminal_is_one_bar_redrawn_in_place_then_the_summary():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    progress = Progress("tokenizing", 4_000_000, stream=out)
    progress.BAR_EVERY_S = 0.0
    for done in (1_000_000, 2_000_000, 4_000_000):
        progress.update(done, documents=done // 1000, tokens=done)
    progress.finish("tokenized 1 files: 4,000 documents, 4,000,000 tokens in 1.0s")
    bars = out.getvalue().split("\r")[1:]
    assert [b.split("] ")[1].split()[0] for b in bars[:3]] == ["25%", "50%", "100%"]
    assert bars[0].startswith("tokenizing [######..................]") and "ETA " in bars[0]
    assert "\n" not in "".join(bars[:3])  # redrawn in place
    assert bars[3] == "\x1b[Ktokenized 1 files: 4,000 documents, 4,000,000 tokens in 1.0s\n"


# ---------------------------------------------------------------------------
# The largest token id, recorded at build time


def tiny_sentencepiece(tmp_path: Path):
    """A Llama 2 style tokenizer: bos 1, eos 2, so the largest id is a text token."""
    import sentencepiece
    import sysconfig

    (tmp_path / "sp.txt").write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text())
    with open(os.devnull, "w") as quiet:
        sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "sp.txt"), vocab_size=300,
                                                 model_prefix=str(tmp_path / "sp"), logstream=quiet)
    return load_tokenizer(tmp_path / "sp.model")


def test_max_token_id_is_recorded_when_built_and_read_back_without_a_scan(tmp_path, monkeypatch):
    sp = tiny_sentencepiece(tmp_path)
    lines = [line for line in (tmp_path / "sp.txt").read_text().splitlines() if line.strip()]
    top = max(max(sp.encode(line)) for line in lines)
    docs = [line for line in lines if max(sp.encode(line)) < top]
    docs.append(next(line for line in lines if max(sp.encode(line)) == top))  # the largest id: last chunk only
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    monkeypatch.setattr(files, "PART_BYTES", 500)
    assert len(docs) > 100 and top > sp.eos_id
    expected = top

    built = load_token_cache(tmp_path / "a.jsonl", sp, tmp_path / "cache", quiet=True)
    assert built.max_token_id == expected == int(built.tokens.max())
    assert json.loads(built.path.read_text())["max_token_id"] == expected
    monkeypatch.setattr(token_cache, "largest_token_id", lambda tokens: pytest.fail("scanned the cache on a hit"))
    hit = load_token_cache(tmp_path / "a.jsonl", sp, tmp_path / "cache", quiet=True)
    assert hit.hit and hit.max_token_id == expected


def test_conversation_cache_records_max_token_id_and_an_in_memory_cache_computes_it(tmp_path):
    (tmp_path / "chat.jsonl").write_text(conversations(3))
    built = load_conversation_cache(tmp_path / "chat.jsonl", BYTES, tmp_path / "cache", train_on="all", quiet=True)
    assert built.max_token_id == BYTES.special_tokens["<|eot_id|>"] == int(built.tokens.max())
    hit = load_conversation_cache(tmp_path / "chat.jsonl", BYTES, tmp_path / "cache", train_on="all", quiet=True)
    assert hit.hit and hit.max_token_id == built.max_token_id
    tokens = np.array([5, 900, 7], dtype=np.uint32)
    assert TokenCache(tokens, np.array([0, 3]), [], Path("x.json"), hit=False).max_token_id == 900


@pytest.mark.parametrize("module, version, before, load", [
    (token_cache, "CACHE_VERSION", 2,
     lambda path, cache_dir: load_token_cache(path / "docs.jsonl", BYTES, cache_dir, quiet=True)),
    (chat_cache, "CHAT_CACHE_VERSION", 1,
     lambda path, cache_dir: load_conversation_cache(path / "chat.jsonl", BYTES, cache_dir, quiet=True)),
], ids=["text", "chat"])
def test_a_cache_from_before_max_token_id_is_rebuilt(tmp_path, monkeypatch, module, version, before, load):
    (tmp_path / "chat.jsonl").write_text(conversations(3))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    with monkeypatch.context() as m:  # as that version wrote it: its number in the key, no max_token_id
        m.setattr(module, version, before)
        old = load(tmp_path, tmp_path / "cache")
    meta = json.loads(old.path.read_text())
    del meta["max_token_id"]
    old.path.write_text(json.dumps(meta))

    new = load(tmp_path, tmp_path / "cache")
    assert not new.hit and new.max_token_id == int(new.tokens.max())
    assert json.loads(new.path.read_text())["version"] == getattr(module, version) > before

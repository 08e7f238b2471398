"""Data pipeline: token cache, packed windows, data-parallel batches and resumption."""

import importlib.resources
import inspect
import json
import os
import sysconfig
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from llama.data import files
from llama.data.errors import DataError
from llama.data.files import default_corpus_paths
from llama.data.loader import DistributedDataLoader, micro_batch_size
from llama.data.packed import PackedDataset
from llama.data.token_cache import default_cache_dir, load_token_cache
from llama.data.windows import Permutation
from llama.tokenizer import ByteTokenizer, load_tokenizer

LLAMA3_MODEL = Path(str(importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"))
BYTES = ByteTokenizer()


def write_corpus(root: Path) -> list[str]:
    """A small corpus of every accepted kind; returns its documents in cache order."""
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("The first document.\nIt has two lines.\n")
    records = [{"text": "jsonl one"}, {"text": ""}, {"id": 7, "text": "jsonl two, 你好"}]
    (root / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (root / "sub" / "c.md").write_text("# Markdown\n\nThird *file*.")
    (root / "sub" / "empty.txt").write_text("")
    (root / ".hidden" / "skipped.txt").write_text("never read")
    (root / "image.png").write_bytes(b"\x89PNG never read")
    return ["The first document.\nIt has two lines.\n", "jsonl one", "jsonl two, 你好",
            "# Markdown\n\nThird *file*."]


def assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def numbered_windows(num_samples: int, seq_len: int) -> PackedDataset:
    """Tokens 0, 1, 2, ...: window w's first input token is w * seq_len."""
    return PackedDataset(np.arange(num_samples * seq_len + 1, dtype=np.uint32), seq_len, seed=1234)


def window_ids(inputs: torch.Tensor, seq_len: int) -> list[int]:
    return (inputs[:, 0] // seq_len).tolist()


# ---------------------------------------------------------------------------
# Token cache


def tiny_sentencepiece(tmp_path: Path) -> Path:
    import sentencepiece
    (tmp_path / "sp.txt").write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text())
    with open(os.devnull, "w") as quiet:
        sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "sp.txt"), vocab_size=300,
                                                 model_prefix=str(tmp_path / "sp"), logstream=quiet)
    return tmp_path / "sp.model"


def test_cache_holds_every_document_framed_by_bos_eos_in_sorted_order(tmp_path):
    docs = write_corpus(tmp_path / "data")
    tokenizers = [BYTES, load_tokenizer(LLAMA3_MODEL), load_tokenizer(tiny_sentencepiece(tmp_path))]
    for tok in tokenizers:
        cache = load_token_cache(tmp_path / "data", tok, tmp_path / "cache", quiet=True)
        assert [f.name for f in cache.files] == ["a.txt", "b.jsonl", "c.md", "empty.txt"]
        assert cache.num_docs == len(docs)
        assert [cache.document(i).tolist() for i in range(cache.num_docs)] == [
            tok.encode(d, bos=True, eos=True) for d in docs]
        assert cache.tokens.dtype == np.uint32 and cache.num_tokens == cache.doc_offsets[-1]


def test_second_load_is_a_cache_hit_and_a_changed_source_invalidates_it(tmp_path, monkeypatch):
    write_corpus(tmp_path)
    first = load_token_cache(tmp_path, BYTES, quiet=True)
    assert not first.hit and first.path.parent == tmp_path / ".token_cache"  # default: next to the data

    with monkeypatch.context() as m:  # a hit must not tokenize anything
        m.setattr(ByteTokenizer, "encode_batch", lambda *a, **k: pytest.fail("re-tokenized on a hit"))
        second = load_token_cache(tmp_path, BYTES, quiet=True)
    assert second.hit and np.array_equal(second.tokens, first.tokens)

    (tmp_path / "a.txt").write_text("The first document, edited.\n")
    third = load_token_cache(tmp_path, BYTES, quiet=True)
    assert not third.hit and third.document(0).tolist() == BYTES.encode(
        "The first document, edited.\n", bos=True, eos=True)
    assert load_token_cache(tmp_path, BYTES, quiet=True).hit
    assert not load_token_cache(tmp_path, load_tokenizer(LLAMA3_MODEL), quiet=True).hit  # other tokenizer


def test_document_index_is_memory_mapped_and_stays_mapped_in_the_dataset(tmp_path):
    write_corpus(tmp_path / "data")
    for hit in (False, True):
        cache = load_token_cache(tmp_path / "data", BYTES, tmp_path / "cache", quiet=True)
        assert cache.hit == hit
        assert isinstance(cache.doc_offsets, np.memmap) and not cache.doc_offsets.flags.writeable
        dataset = PackedDataset(cache, seq_len=4, document_masking=True)
        assert np.shares_memory(dataset._cum, cache.doc_offsets)  # not a private copy per rank


def test_progress_goes_to_stderr_unless_quiet(tmp_path, capsys, monkeypatch):
    docs = write_corpus(tmp_path / "data")
    for i in range(4):
        (tmp_path / "data" / f"big{i}.txt").write_text("many words " * 10_000)  # 110 kB each
        docs.append("many words " * 10_000)
    num_tokens = sum(len(BYTES.encode(d, bos=True, eos=True)) for d in docs)
    monkeypatch.setattr(files, "PART_BYTES", 100_000)  # chunks end at 25%, 50%, 75%, 99.98%, 100%
    load_token_cache(tmp_path / "data", BYTES, tmp_path / "cache")
    out, err = capsys.readouterr()
    progress = [line for line in err.splitlines() if line.startswith("tokenizing: ")]
    assert out == "" and [line.split()[1] for line in progress] == ["25%", "50%", "75%", "100%", "100%"]
    assert f"tokenized 8 files: 8 documents, {num_tokens:,} tokens in " in err
    load_token_cache(tmp_path / "data", BYTES, tmp_path / "cache")
    assert "token cache hit" in capsys.readouterr().err
    load_token_cache(tmp_path / "data", BYTES, tmp_path / "cache2", quiet=True)
    assert capsys.readouterr() == ("", "")


def test_default_corpus_is_a_few_mb_of_stdlib_sources(tmp_path):
    paths = default_corpus_paths()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(paths) >= 40 and all(p.is_file() and stdlib in p.parents for p in paths)
    assert 0.5e6 < sum(p.stat().st_size for p in paths) < 5e6
    assert default_cache_dir(paths) != stdlib / ".token_cache"  # never writes into the Python install
    cache = load_token_cache(paths, BYTES, tmp_path, quiet=True)
    assert cache.num_docs == len(paths)


# ---------------------------------------------------------------------------
# Windows and data-parallel batches


def test_windows_are_shifted_pairs_sharing_one_token():
    ds = numbered_windows(num_samples=10, seq_len=4)
    inputs, targets = ds.get_batch(0, dp_rank=0, dp_size=1, micro_batch=10)[:2]
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (10, 4)
    assert torch.equal(targets, inputs + 1)
    assert sorted(window_ids(inputs, 4)) == list(range(10)) != window_ids(inputs, 4)  # shuffled


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_one_epoch_on_any_dp_size_yields_every_sample_exactly_once(dp_size):
    seq_len, num_samples, global_batch = 4, 48, 12
    ds = numbered_windows(num_samples, seq_len)
    loaders = [DistributedDataLoader(ds, global_batch=global_batch, dp_rank=r, dp_size=dp_size)
               for r in range(dp_size)]
    seen = []
    for _ in range(num_samples // global_batch):
        for loader in loaders:
            inputs, targets = next(loader)[:2]
            assert inputs.shape == (global_batch // dp_size, seq_len) and torch.equal(targets, inputs + 1)
            seen += window_ids(inputs, seq_len)
    assert sorted(seen) == list(range(num_samples))
    assert all(loader.sample == num_samples and loader.epoch == 1 for loader in loaders)


def _batches_on_a_2x2_mesh(corpus: str) -> dict:
    """One rank of train.py's set-up: the ("dp", "tp") mesh, the loader split by this rank's
    dp coordinate, three batches; with the rank's tp group (ranks of one tp group)."""
    import torch.distributed as dist

    from parallel.mesh import build_mesh, dp_rank, dp_size

    mesh = build_mesh(tp=2, device="cpu")
    cache = load_token_cache(corpus, BYTES, quiet=True)
    loader = DistributedDataLoader(PackedDataset(cache, seq_len=8, seed=7), global_batch=4,
                                   dp_rank=dp_rank(mesh), dp_size=dp_size(mesh))
    return {"rank": dist.get_rank(), "tp_group": mesh["tp"].mesh.tolist(),
            "batches": [[None if t is None else t.tolist() for t in next(loader)] for _ in range(3)]}


def test_tensor_parallel_ranks_of_one_dp_group_get_identical_batches(tmp_path):
    """On a real 2x2 mesh the two ranks of a tp group draw the same batches (every field),
    and the two tp groups draw different ones."""
    from parallel.spawn import run_on_ranks

    write_corpus(tmp_path)
    load_token_cache(tmp_path, BYTES, quiet=True)  # tokenized once, before the ranks read it
    ranks = run_on_ranks(_batches_on_a_2x2_mesh, 4, str(tmp_path))
    groups = {tuple(r["tp_group"]) for r in ranks}
    assert groups == {(0, 1), (2, 3)}  # tp innermost: the tp groups are ranks 0, 1 and 2, 3

    for a in ranks:
        for b in ranks:
            assert (a["batches"] == b["batches"]) == (a["tp_group"] == b["tp_group"]), (a["rank"], b["rank"])


@pytest.mark.parametrize("before, after", [((2, 2), (3, 1)), ((4, 1), (1, 3)), ((3, 4), (2, 2))])
def test_resuming_on_another_dp_size_yields_exactly_the_unseen_samples(before, after):
    """(dp_size, grad_accum) before and after a checkpoint; the global batch stays 12.
    The run stops mid-epoch 1 (step 5) so the epoch boundary is crossed both ways."""
    seq_len, num_samples, global_batch, stop_step = 4, 48, 12, 5
    steps_per_epoch = num_samples // global_batch
    ds = numbered_windows(num_samples, seq_len)
    seen_per_epoch = {0: [], 1: []}

    def train(dp_size, grad_accum, steps, state=None):
        loaders = [DistributedDataLoader(ds, global_batch=global_batch, dp_rank=r, dp_size=dp_size,
                                         grad_accum=grad_accum) for r in range(dp_size)]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        for step in steps:
            for _ in range(grad_accum):
                for loader in loaders:
                    seen_per_epoch[step // steps_per_epoch] += window_ids(next(loader)[0], seq_len)
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states)  # any rank's state resumes everyone
        return states[0]

    state = train(*before, range(stop_step))
    assert state["sample"] == stop_step * global_batch
    train(*after, range(stop_step, 2 * steps_per_epoch), state)
    for epoch, seen in seen_per_epoch.items():
        assert sorted(seen) == list(range(num_samples)), f"epoch {epoch}"
    assert [ds.window_index(i) for i in range(num_samples)] != [
        ds.window_index(num_samples + i) for i in range(num_samples)]  # a new order per epoch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_order_is_a_permutation_for_every_small_size(seed):
    # sizes just below, at and above the powers of 4 the Feistel domain switches at
    for n in list(range(1, 80)) + [255, 256, 257, 1023, 1024, 1025, 4097]:
        for epoch in (0, 1):
            assert sorted(Permutation(n, seed, epoch)[i] for i in range(n)) == list(range(n)), (n, epoch)


def test_window_order_of_10e12_windows_answers_lookups_in_constant_memory():
    n, lookups = 10**12, 20_000
    samples = np.random.default_rng(0).choice(n, lookups, replace=False).tolist()
    tracemalloc.start()
    try:
        order = Permutation(n, seed=7, epoch=3)
        windows = [order[i] for i in samples]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, f"{peak} bytes"  # the list of answers is most of it
    assert all(0 <= w < n for w in windows) and len(set(windows)) == lookups  # no collisions on the sample
    assert windows == [Permutation(n, seed=7, epoch=3)[i] for i in samples]  # same on every rank
    assert windows != [Permutation(n, seed=7, epoch=4)[i] for i in samples]
    assert windows != [Permutation(n, seed=8, epoch=3)[i] for i in samples]


def test_window_order_looks_shuffled():
    n = 100_000
    order = np.array([Permutation(n, seed=0, epoch=0)[i] for i in range(n)])
    assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.02
    assert abs(np.abs(np.diff(order)).mean() / n - 1 / 3) < 0.01  # a random permutation's mean step
    assert (np.diff(order) == 1).sum() < 10  # no runs of neighbouring windows (expected: 1)


def test_batches_iterator_matches_the_loader():
    ds = numbered_windows(num_samples=20, seq_len=4)
    loader = DistributedDataLoader(ds, global_batch=6, dp_rank=1, dp_size=3)
    loader.sample = 6
    it = ds.batches(dp_rank=1, dp_size=3, micro_batch=2, start_sample=6)
    for _ in range(5):
        a, b = next(it), next(loader)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
        assert a.document_ids is b.document_ids is None


def test_load_state_dict_rejects_another_seq_len_or_seed():
    state = DistributedDataLoader(numbered_windows(48, 4), global_batch=4).state_dict()
    other = PackedDataset(np.arange(48 * 4 + 1), seq_len=4, seed=99)
    with pytest.raises(DataError) as err:
        DistributedDataLoader(other, global_batch=4).load_state_dict(state)
    assert_one_line_error(err, "seed=1234", "seed=99", "same data, seq_len and seed")


# ---------------------------------------------------------------------------
# Bad input: one clear error


def test_global_batch_not_divisible_among_dp_ranks_is_a_clear_error():
    assert micro_batch_size(24, dp_size=3, grad_accum=2) == 4
    with pytest.raises(DataError) as err:
        micro_batch_size(10, dp_size=4)
    assert_one_line_error(err, "global batch 10", "dp_size 4", "8 or 12")
    with pytest.raises(DataError) as err:
        DistributedDataLoader(numbered_windows(48, 4), global_batch=12, dp_size=3, grad_accum=3)
    assert_one_line_error(err, "global batch 12", "grad_accum 3", "9 or 18")


def test_corpus_smaller_than_one_batch_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("only a few bytes of text")  # 26 tokens with BOS/EOS
    cache = load_token_cache(tmp_path / "tiny.txt", BYTES, tmp_path / "cache", quiet=True)
    with pytest.raises(DataError) as err:
        DistributedDataLoader(PackedDataset(cache, seq_len=8), global_batch=4)
    assert_one_line_error(err, str(tmp_path / "tiny.txt"), "3 windows", "global batch of 4")
    with pytest.raises(DataError) as err:
        PackedDataset(cache, seq_len=64)
    assert_one_line_error(err, str(tmp_path / "tiny.txt"), "lower seq_len")


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "no_data").mkdir()
    (tmp_path / "no_data" / "notes.bin").write_bytes(b"\0")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n  \n")
    (tmp_path / "empty" / "blank.jsonl").write_text('{"text": ""}\n\n')
    cases = {tmp_path / "no_data": "no data files", tmp_path / "empty": "empty corpus",
             tmp_path / "missing.txt": "no such data file"}
    for source, fragment in cases.items():
        with pytest.raises(DataError) as err:
            load_token_cache(source, BYTES, tmp_path / "cache", quiet=True)
        assert_one_line_error(err, str(source.name), fragment)
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind


def test_bad_jsonl_line_is_a_clear_error_naming_file_and_line(tmp_path):
    good = '{"text": "fine"}\n'
    cases = {"not_json.jsonl": (good + good + "{'text': 'single quotes'}\n", ":3: not valid JSON"),
             "no_text.jsonl": (good + '{"content": "x", "id": 1}\n', ':2: JSON object has no "text" field'),
             "not_str.jsonl": ('{"text": 42}\n', ':1: "text" is a JSON int'),
             "not_object.jsonl": (good + '["text"]\n', ":2: expected a JSON object")}
    for name, (content, fragment) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError) as err:
            load_token_cache(tmp_path / name, BYTES, tmp_path / "cache", quiet=True)
        assert_one_line_error(err, f"{tmp_path / name}{fragment}")


def test_invalid_utf8_is_replaced_counted_and_warned_not_an_error(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"fine line\nbad \xff\xfe here\ntruncated \xc3")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \xe2\x82 byte"}\n')
    cache = load_token_cache(tmp_path, BYTES, tmp_path / "cache", quiet=True)
    assert cache.invalid_utf8 == 4
    assert BYTES.decode(cache.document(2)) == "<|begin_of_text|>fine line\nbad \ufffd\ufffd here\ntruncated \ufffd<|end_of_text|>"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'bad.jsonl'}:2: 1 invalid UTF-8 byte sequence(s) replaced with U+FFFD",
        f"warning: {tmp_path / 'bad.txt'}:2: 3 invalid UTF-8 byte sequence(s) replaced with U+FFFD"]


def test_the_package_re_exports_the_names_imported_from_llama_data_and_llama_chat_before_it():
    import llama.data
    from llama.data import chat

    assert llama.data.encode_conversation is chat.encode_conversation
    for name in llama.data.__all__:
        value = getattr(llama.data, name)
        if inspect.isfunction(value) or isinstance(value, type):  # not the constants and type aliases
            assert value.__module__.startswith("llama.data."), f"{name} comes from {value.__module__}"

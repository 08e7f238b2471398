"""Preference data for DPO: pairs encoded exactly as SFT encodes them, detection, bad lines,
the pair cache, and PairDataset's batches (chosen and rejected interleaved, pair ids, padding
pairs, pairs dropped and never truncated, the reference pass over every pair once)."""

import importlib.resources
import json
from pathlib import Path

import numpy as np
import pytest

from llama.data import files
from llama.data.chat import detect_data_format, encode_conversation, is_chat_data, is_preference_data
from llama.data.chat_cache import load_conversation_cache
from llama.data.cli import main, prepare
from llama.data.errors import DataError
from llama.data.loader import DistributedDataLoader, eval_batches, split_documents
from llama.data.pair_cache import PairCache, load_pair_cache, open_pair_cache
from llama.data.pair_dataset import PairDataset
from llama.data.windows import IGNORE_INDEX
from llama.tokenizer import ByteTokenizer, load_tokenizer
from tests.test_chat import rewrite_keeping_size_and_mtime, write_jsonl
from tests.test_data import assert_one_line_error

LLAMA3_MODEL = Path(str(importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"))
BYTES = ByteTokenizer()
EOT = BYTES.special_tokens["<|eot_id|>"]
SEQ_LEN = 48  # every pair(i) with replies of up to 7 characters fits: 41 tokens at most

PROMPT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  What is 2+2?\n"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 你好 👋 times 3?"},
]


def pair(i: int, chosen_len: int = 3, rejected_len: int = 5) -> dict:
    """A standard pair with a unique prompt and replies of the given numbers of characters."""
    return {"prompt": f"question {i}", "chosen": chr(ord("a") + i % 26) * chosen_len,
            "rejected": chr(ord("A") + i % 26) * rejected_len}


def pair_cache(tmp_path: Path, lengths, **kwargs) -> PairCache:
    """Pairs i with chosen / rejected replies of lengths[i] characters."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair(i, c, r) for i, (c, r) in enumerate(lengths)])
    return load_pair_cache(path, BYTES, tmp_path / "cache", quiet=True, **kwargs)


def as_lists(sequence) -> tuple[list, list]:
    ids, labels = sequence
    return ids.tolist(), labels.tolist()


# ---------------------------------------------------------------------------
# A pair is SFT's encoding of the prompt and each reply


def test_standard_pair_is_token_for_token_sft_prompt_completion_with_train_on_last(tmp_path):
    pairs = [{"prompt": "  Add 2 and 2.\n", "chosen": "4", "rejected": " Five, roughly.\n\n"},
             {"prompt": "Say 你好 👋", "chosen": "你好", "rejected": ""},
             {"prompt": "", "chosen": "x", "rejected": "y", "score_chosen": 9}]  # extra keys are ignored
    cache = load_pair_cache(write_jsonl(tmp_path / "p.jsonl", pairs), BYTES, tmp_path / "cache", quiet=True)
    for side in ("chosen", "rejected"):
        sft = write_jsonl(tmp_path / f"sft_{side}.jsonl",
                          [{"prompt": p["prompt"], "completion": p[side]} for p in pairs])
        sft_cache = load_conversation_cache(sft, BYTES, tmp_path / "cache", train_on="last", quiet=True)
        for i in range(len(pairs)):
            assert as_lists(cache.pair(i)[side == "rejected"]) == as_lists(sft_cache.conversation(i)), (side, i)
    assert cache.num_pairs == cache.num_docs == 3


@pytest.mark.parametrize("form", ["string", "message", "list of one message"])
def test_conversational_pair_is_sft_chat_of_the_prompt_then_the_reply_trained_on_the_reply_only(tmp_path, form):
    def reply(text):
        message = {"role": "assistant", "content": text}
        return {"string": text, "message": message, "list of one message": [message]}[form]

    chosen, rejected = " Twelve, roughly.\n\n", "Thirty-six."
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": PROMPT, "chosen": reply(chosen),
                                               "rejected": reply(rejected)}])
    cache = load_pair_cache(path, BYTES, tmp_path / "cache", quiet=True)
    for got, text in zip(cache.pair(0), (chosen, rejected)):
        ids, labels = as_lists(got)
        assert (ids, labels) == encode_conversation(
            BYTES, PROMPT + [{"role": "assistant", "content": text}], train_on="last")
        assert [t for t in labels if t != IGNORE_INDEX] == BYTES.encode(text.strip()) + [EOT]  # the reply only


# ---------------------------------------------------------------------------
# Detection


def test_preference_is_detected_before_prompt_completion_and_data_format_forces_it(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", ["", pair(0)])
    write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "x", "completion": "y"}])
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    assert [detect_data_format(tmp_path / n) for n in ("pairs.jsonl", "pc.jsonl", "chat.jsonl")] == [
        "preference", "prompt-completion", "chat"]
    assert is_preference_data(tmp_path / "pairs.jsonl") and is_preference_data(tmp_path)
    assert not is_preference_data(tmp_path / "pc.jsonl") and not is_preference_data(tmp_path / "chat.jsonl")
    assert is_chat_data(tmp_path / "pc.jsonl") and is_chat_data(tmp_path / "chat.jsonl")  # SFT data still is

    forced = write_jsonl(tmp_path / "pairs.json", [pair(0)])  # not .jsonl: read as text unless forced
    assert detect_data_format(forced) == "text" and detect_data_format(forced, "preference") == "preference"
    assert load_pair_cache(forced, BYTES, tmp_path / "cache", data_format="preference", quiet=True).num_pairs == 1
    with pytest.raises(DataError) as err:
        load_pair_cache(forced, BYTES, tmp_path / "cache", quiet=True)
    assert_one_line_error(err, f"{forced}: is not preference data (it reads as text)", "--data-format preference")


def test_sft_refuses_preference_data_and_pairs_refuse_sft_data_naming_file_and_fix(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0)])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                               {"role": "assistant", "content": "y"}]}])
    for data_format in ("auto", "preference"):
        with pytest.raises(DataError) as err:
            load_conversation_cache(pairs, BYTES, tmp_path / "cache", data_format=data_format, quiet=True)
        assert_one_line_error(err, f"{pairs}: is preference data (prompt/chosen/rejected)", "--objective dpo")
    with pytest.raises(DataError) as err:
        load_pair_cache([pairs, chat], BYTES, tmp_path / "cache", quiet=True)
    assert_one_line_error(err, f"{chat}: is not preference data (it reads as chat)", '"chosen"', "--objective dpo")
    with pytest.raises(DataError) as err:
        load_pair_cache(pairs, BYTES, tmp_path / "cache", data_format="chat", quiet=True)
    assert_one_line_error(err, "--data-format chat is not preference data", "--data-format preference or auto")
    assert not list((tmp_path / "cache").glob("*"))


# ---------------------------------------------------------------------------
# Bad lines


BAD_LINES = {
    "not_json": ("{'prompt': 'x'}", "not valid JSON"),
    "not_an_object": ('["x", "y", "z"]', "expected a JSON object, got a JSON list"),
    "implicit_prompt": ('{"chosen": "a", "rejected": "b"}', 'no "prompt" field (keys: chosen, rejected); move '),
    "prompt_a_number": ('{"prompt": 7, "chosen": "a", "rejected": "b"}', '"prompt" is a JSON int'),
    "prompt_an_empty_list": ('{"prompt": [], "chosen": "a", "rejected": "b"}', '"prompt" must be a non-empty list'),
    "prompt_unknown_role": ('{"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}',
                            "message 1 has unknown role 'bot'"),
    "no_rejected": ('{"prompt": "x", "chosen": "a"}', 'no "rejected" field (keys: prompt, chosen)'),
    "chosen_a_number": ('{"prompt": "x", "chosen": 1, "rejected": "b"}', '"chosen" is a JSON int'),
    "reply_from_user": ('{"prompt": "x", "chosen": "a", "rejected": {"role": "user", "content": "b"}}',
                        '"rejected" is a message with role \'user\', not the assistant\'s reply'),
    "reply_of_two_messages": ('{"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}, '
                              '{"role": "assistant", "content": "b"}], "rejected": "b"}',
                              '"chosen" is a list of 2 messages, expected exactly one assistant message'),
    "reply_content_a_list": ('{"prompt": "x", "chosen": {"role": "assistant", "content": ["a"]}, "rejected": "b"}',
                             '"chosen" "content" is a JSON list'),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_is_an_error_naming_file_line_and_fix(tmp_path, case):
    line, reason = BAD_LINES[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", [pair(0), "", line])
    with pytest.raises(DataError) as err:
        load_pair_cache(path, BYTES, tmp_path / "cache", quiet=True)
    assert_one_line_error(err, f"{path}:3: {reason}", "--skip-bad-lines")
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind


def test_skip_bad_lines_counts_skips_and_identical_pairs_in_one_warning_line_each(tmp_path, capsys):
    same = {"prompt": "x", "chosen": "same", "rejected": [{"role": "assistant", "content": " same "}]}
    write_jsonl(tmp_path / "x.jsonl", [pair(0), BAD_LINES["reply_from_user"][0], pair(1), same,
                                       BAD_LINES["not_json"][0], BAD_LINES["implicit_prompt"][0], same])
    write_jsonl(tmp_path / "y.jsonl", [pair(2)])
    cache = load_pair_cache(tmp_path, BYTES, tmp_path / "cache", skip_bad_lines=True, quiet=True)
    assert cache.num_pairs == 5  # the identical pairs are kept
    for i in (2, 3):
        chosen, rejected = cache.pair(i)
        assert as_lists(chosen) == as_lists(rejected)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'x.jsonl'}: skipped 3 bad lines (first: line 2: \"rejected\" is a message with "
        "role 'user', not the assistant's reply)",
        f"warning: {tmp_path / 'x.jsonl'}: 2 pairs have chosen == rejected (first: line 4); kept, as TRL keeps "
        "them: each states no preference (a DPO loss of log 2, no gradient)"]
    load_pair_cache(tmp_path, BYTES, tmp_path / "cache", skip_bad_lines=True, quiet=True)  # a hit says it again
    assert len([line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]) == 2


# ---------------------------------------------------------------------------
# The pair cache


def test_pair_cache_is_reused_opened_by_other_ranks_and_rebuilt_when_the_file_or_tokenizer_changes(
        tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", [pair(0), pair(1, 2, 7)])
    first = load_pair_cache(path, BYTES, tmp_path / "cache", quiet=True)
    assert not first.hit and first.path.name.endswith(".pairs.json")
    with monkeypatch.context() as m:  # a hit must not encode anything
        m.setattr("llama.data.preference.encode_pair", lambda *a, **k: pytest.fail("re-encoded on a hit"))
        second = load_pair_cache(path, BYTES, tmp_path / "cache", quiet=True)
        opened = open_pair_cache(first.path, path)  # another rank, without hashing the files
    for cache in (second, opened):
        assert cache.hit and cache.key == first.key and cache.max_token_id == first.max_token_id
        assert [as_lists(s) for i in range(2) for s in cache.pair(i)] == [
            as_lists(s) for i in range(2) for s in first.pair(i)]

    rewrite_keeping_size_and_mtime(path, "".join(json.dumps(p) + "\n" for p in [pair(2), pair(3, 2, 7)]))
    changed = load_pair_cache(path, BYTES, tmp_path / "cache", quiet=True)
    assert not changed.hit and changed.key != first.key
    assert as_lists(changed.pair(0)[0]) == encode_conversation(
        BYTES, [{"role": "user", "content": "question 2"}, {"role": "assistant", "content": "ccc"}], "last")
    skipping = load_pair_cache(path, BYTES, tmp_path / "cache", skip_bad_lines=True, quiet=True)
    assert not skipping.hit and skipping.key != changed.key  # skipping can change which pairs there are
    llama3 = load_pair_cache(path, load_tokenizer(LLAMA3_MODEL), tmp_path / "cache", quiet=True)
    assert not llama3.hit and llama3.key not in (changed.key, skipping.key)
    assert load_pair_cache(path, BYTES, tmp_path / "cache", quiet=True).key == changed.key  # still there


def test_prepare_builds_the_pair_caches_train_and_validation_on_two_workers_as_on_one(tmp_path, monkeypatch,
                                                                                       capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [pair(i, i % 7, 9 - i % 5) for i in range(300)]
                        + [{"prompt": "x", "chosen": "s", "rejected": "s"}])
    val = write_jsonl(tmp_path / "val.jsonl", [pair(i) for i in range(5)])
    monkeypatch.setattr(files, "PART_BYTES", 4_000)  # several chunks, so both workers get some
    caches = prepare([train], BYTES, tmp_path / "two", val_data=[val], workers=2)
    summary = [line for line in capsys.readouterr().err.splitlines() if line.startswith("encoded ")][0]
    assert summary.startswith("encoded 1 files: 301 pairs, ") and "2 workers" in summary, summary
    assert [type(c) for c in caches] == [PairCache, PairCache] and [c.num_pairs for c in caches] == [301, 5]
    assert caches[0].identical == {str(train): [1, "line 301"]}  # counted across the workers' chunks
    assert main(["prepare", "--data", str(train), "--val-data", str(val), "--cache-dir", str(tmp_path / "one"),
                 "--workers", "1"]) == 0
    for paths, cache in zip((train, val), caches):
        serial = load_pair_cache(paths, BYTES, tmp_path / "one", quiet=True)
        assert serial.hit and serial.key == cache.key
        stem = serial.path.name.removesuffix(".json")
        assert {f.name: f.read_bytes() for f in serial.path.parent.glob(stem + ".*") if f.suffix != ".json"} == {
            f.name: f.read_bytes() for f in cache.path.parent.glob(stem + ".*") if f.suffix != ".json"}


# ---------------------------------------------------------------------------
# PairDataset


def expected_rows(ds: PairDataset, pair_index: int) -> list[tuple[list, list]]:
    """The two rows of kept pair `pair_index`, built from the cache: inputs ids[:-1], targets
    labels[1:], each padded to seq_len with 0 and IGNORE_INDEX."""
    rows = []
    for ids, labels in ds.cache.pair(int(ds.pairs[pair_index])):
        pad = ds.seq_len - (len(ids) - 1)
        rows.append((ids[:-1].tolist() + [0] * pad, labels[1:].tolist() + [IGNORE_INDEX] * pad))
    return rows


def test_a_pair_longer_than_seq_len_plus_one_is_dropped_and_counted_never_truncated(tmp_path):
    cache = pair_cache(tmp_path, [(3, 5), (3, 40), (30, 2), (8, 8)])
    lengths = [max(len(s[0]) for s in cache.pair(i)) for i in range(4)]
    seq_len = lengths[3] - 1  # pair 3 fits exactly: seq_len + 1 tokens
    ds = PairDataset(cache, seq_len)
    assert ds.pairs.tolist() == [0, 3] and ds.num_samples == 2 and ds.num_dropped == 2
    assert ds.num_tokens == sum(len(s[0]) for i in (0, 3) for s in cache.pair(i))
    for i in range(2):  # the kept pairs whole: every label of both sequences is a target
        inputs, targets, doc_ids = ds.row(i)
        assert doc_ids is None and [(a.tolist(), b.tolist()) for a, b in zip(inputs, targets)] == expected_rows(ds, i)
        assert ds.num_targets(i) == sum(int((s[1] != IGNORE_INDEX).sum()) for s in cache.pair(int(ds.pairs[i])))
    filled = 100 * ds.num_tokens / (2 * 2 * (seq_len + 1))  # 2 pairs of 2 rows of seq_len + 1
    assert ds.summary("train") == (f"train: 2 pairs (2 dropped: longer than --seq-len + 1 = {seq_len + 1} "
                                   f"tokens), {ds.num_tokens:,} tokens, {filled:.1f}% of the padded rows")
    assert PairDataset(cache, max(lengths) - 1).summary("validation").startswith("validation: 4 pairs, ")
    with pytest.raises(DataError) as err:
        PairDataset(cache, min(lengths) - 2)
    assert_one_line_error(err, str(cache.files[0]), "all 4 pairs are longer than --seq-len + 1",
                          f"the longest, pair 1 of the cache, {max(lengths)}", "never truncated",
                          f"raise --seq-len to at least {min(lengths) - 1} (to keep every pair, {max(lengths) - 1})")


def test_batch_rows_are_chosen_then_rejected_per_pair_with_pair_ids_and_padding_pairs(tmp_path):
    ds = PairDataset(pair_cache(tmp_path, [(i % 4, 6 - i % 3) for i in range(7)]), seq_len=SEQ_LEN, seed=3,
                     id_offset=100)
    batch = ds.get_batch(4, dp_rank=1, dp_size=2, micro_batch=2, stop=7)  # samples 6 and 7 (past the end)
    assert batch.inputs.shape == batch.targets.shape == (4, SEQ_LEN) and batch.document_ids is None
    assert batch.pair_ids.dtype == batch.inputs.dtype and batch.pair_ids.shape == (2,)
    pair6 = ds.window_index(6)
    assert batch.pair_ids.tolist() == [pair6 + 100, -1]
    rows = [(i.tolist(), t.tolist()) for i, t in zip(batch.inputs, batch.targets)]
    assert rows[:2] == expected_rows(ds, pair6)  # row 0 chosen, row 1 rejected
    assert rows[2:] == [([0] * SEQ_LEN, [IGNORE_INDEX] * SEQ_LEN)] * 2  # a padding pair: no targets
    assert int((batch.targets != IGNORE_INDEX).sum()) == ds.num_targets(6)

    whole = ds.get_batch(0, dp_rank=0, dp_size=1, micro_batch=7)  # epoch 0: every pair once, seeded order
    assert sorted(whole.pair_ids.tolist()) == list(range(100, 107)) and whole.pair_ids.tolist() != sorted(
        whole.pair_ids.tolist())
    for j, p in enumerate(whole.pair_ids.tolist()):
        assert [(whole.inputs[r].tolist(), whole.targets[r].tolist()) for r in (2 * j, 2 * j + 1)] == expected_rows(
            ds, p - 100)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_reference_batches_hold_every_pair_once_in_index_order_then_padding_pairs(tmp_path, dp_size):
    ds = PairDataset(pair_cache(tmp_path, [(i % 5, 1 + i % 4) for i in range(7)]), seq_len=SEQ_LEN, seed=5,
                     id_offset=10)
    micro_batch = 2
    per_rank = [list(ds.reference_batches(r, dp_size, micro_batch)) for r in range(dp_size)]
    num_global = -(-7 // (micro_batch * dp_size))
    assert [len(batches) for batches in per_rank] == [num_global] * dp_size  # every rank as many micro-steps
    order = [i for b in range(num_global) for r in range(dp_size) for i in per_rank[r][b].pair_ids.tolist()]
    assert order == list(range(10, 17)) + [-1] * (num_global * micro_batch * dp_size - 7)
    for r in range(dp_size):
        for batch in per_rank[r]:
            for j, p in enumerate(batch.pair_ids.tolist()):
                rows = [(batch.inputs[k].tolist(), batch.targets[k].tolist()) for k in (2 * j, 2 * j + 1)]
                assert rows == (expected_rows(ds, p - 10) if p >= 0 else [([0] * SEQ_LEN, [IGNORE_INDEX] * SEQ_LEN)] * 2)


def test_loader_and_eval_batches_serve_pairs_unchanged_with_padding_pairs_past_the_set(tmp_path, capsys):
    cache = pair_cache(tmp_path, [(i % 6, 2 + i % 5) for i in range(12)])
    train_docs, val_docs = split_documents(cache.num_docs, 0.25, seed=0)
    train = PairDataset(cache, SEQ_LEN, seed=1, documents=train_docs)
    val = PairDataset(cache, SEQ_LEN, documents=val_docs, id_offset=len(train_docs))
    assert train.num_dropped == val.num_dropped == 0
    loader = DistributedDataLoader(train, global_batch=3, dp_rank=0, dp_size=1)
    seen = [i for _ in range(3) for i in next(loader).pair_ids.tolist()]
    assert sorted(seen) == list(range(9))  # one epoch: every training pair once
    assert loader.step_target_tokens() == sum(train.num_targets(s) for s in range(9, 12))

    batches = [b for r in range(2) for b in eval_batches(val, 1, 4, r, 2, 2)]  # 3 pairs, one global batch of 4
    ids = sorted(i for b in batches for i in b.pair_ids.tolist())
    assert ids == [-1, 9, 10, 11] and all(b.inputs.shape == (4, SEQ_LEN) for b in batches)
    for b in batches:
        for j, p in enumerate(b.pair_ids.tolist()):
            assert (p == -1) == bool((b.targets[2 * j:2 * j + 2] == IGNORE_INDEX).all())
    with pytest.raises(DataError) as err:
        DistributedDataLoader(val, global_batch=4)
    assert_one_line_error(err, f"3 pairs of at most --seq-len + 1 = {SEQ_LEN + 1} tokens", "fewer than one global batch of 4")

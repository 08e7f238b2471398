"""Chat data: conversation labels against Meta's chat format, data files and bad
lines, the conversation cache, packing whole conversations, document ids, exact
target counts, validation splits and evaluation batches."""

import importlib.resources
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from llama.data.chat import detect_data_format, encode_conversation, is_chat_data
from llama.data.chat_cache import load_conversation_cache
from llama.data.chat_packing import ChatDataset, pack_windows
from llama.data.errors import DataError
from llama.data.loader import DistributedDataLoader, eval_batches, split_documents
from llama.data.packed import PackedDataset
from llama.data.token_cache import load_token_cache
from llama.data.windows import IGNORE_INDEX
from llama.tokenizer import ByteTokenizer, load_tokenizer
from tests.test_data import assert_one_line_error

LLAMA3_MODEL = Path(str(importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"))
BYTES = ByteTokenizer()
EOT = BYTES.special_tokens["<|eot_id|>"]

DIALOG = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  What is 2+2?\n"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 你好 👋 times 3?"},
    {"role": "assistant", "content": " Twelve, roughly.\n\n"},
]


def conversation(i: int, answer_len: int) -> dict:
    """A chat record with a unique prompt and an answer of answer_len characters."""
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": chr(ord("a") + i % 26) * answer_len}]}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_cache(tmp_path: Path, lengths, **kwargs):
    write_jsonl(tmp_path / "chat.jsonl", [conversation(i, n) for i, n in enumerate(lengths)])
    return load_conversation_cache(tmp_path / "chat.jsonl", BYTES, tmp_path / "cache", quiet=True, **kwargs)


# ---------------------------------------------------------------------------
# One conversation, checked against Meta's reference chat format


@pytest.fixture(scope="module")
def meta_chat():
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer
    return ChatFormat(Tokenizer(LLAMA3_MODEL))


def meta_message_spans(meta_chat, dialog) -> tuple[list[int], list[tuple[str, int, int, int]]]:
    """Meta's tokens for the dialog without the open assistant header, and per
    message (role, start, content start, end) from Meta's own encode_message."""
    from llama_models.datatypes import RawMessage, ToolPromptFormat
    tokens, spans = [meta_chat.tokenizer.special_tokens["<|begin_of_text|>"]], []
    for m in dialog:
        # Meta does not strip content; the Llama 3 format does.
        pieces, _ = meta_chat.encode_message(RawMessage(role=m["role"], content=m["content"].strip()),
                                             ToolPromptFormat.json)
        header = len(meta_chat._encode_header(m["role"]))
        spans.append((m["role"], len(tokens), len(tokens) + header, len(tokens) + len(pieces)))
        tokens += pieces
    return tokens, spans


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_ids_and_labels_match_meta_chat_format_for_each_train_on(meta_chat, train_on):
    llama3 = load_tokenizer(LLAMA3_MODEL)
    ids, labels = encode_conversation(llama3, DIALOG, train_on=train_on)

    from llama_models.datatypes import RawMessage
    prompt = meta_chat.encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"].strip()) for m in DIALOG]).tokens
    open_header = meta_chat._encode_header("assistant")
    assert prompt[-len(open_header):] == open_header
    meta_tokens, spans = meta_message_spans(meta_chat, DIALOG)
    assert ids == prompt[:-len(open_header)] == meta_tokens

    assistant = [s for s in spans if s[0] == "assistant"]
    trained = {"assistant": [(c, e) for _, _, c, e in assistant], "last": [assistant[-1][2:]],
               "all": [(1, len(ids))]}[train_on]
    expected = [IGNORE_INDEX] * len(ids)
    for start, end in trained:
        expected[start:end] = meta_tokens[start:end]
    assert labels == expected
    assert ids[spans[-1][3] - 1] == meta_chat.tokenizer.special_tokens["<|eot_id|>"] == labels[-1]


def test_assistant_labels_cover_content_and_eot_not_header():
    ids, labels = encode_conversation(BYTES, [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": " yo \n"}])
    trained = [BYTES.decode([t]) for t in labels if t != IGNORE_INDEX]
    assert trained == ["y", "o", "<|eot_id|>"] and labels[0] == IGNORE_INDEX and len(ids) == len(labels)


def test_train_on_is_validated_with_the_valid_values():
    with pytest.raises(DataError) as err:
        encode_conversation(BYTES, DIALOG, train_on="assistants")
    assert_one_line_error(err, "'assistants'", "assistant, last, all")


def test_conversation_without_assistant_is_an_error_unless_training_on_all():
    user_only = [{"role": "user", "content": "hello?"}]
    for train_on in ("assistant", "last"):
        with pytest.raises(DataError) as err:
            encode_conversation(BYTES, user_only, train_on=train_on)
        assert_one_line_error(err, "no assistant message", "train_on='all'")
    ids, labels = encode_conversation(BYTES, user_only, train_on="all")
    assert labels == [IGNORE_INDEX] + ids[1:]


# ---------------------------------------------------------------------------
# Data files


def test_alpaca_and_prompt_completion_read_as_one_user_and_one_assistant_turn(tmp_path):
    write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add", "input": "2 and 2", "output": "4"},
                                            {"instruction": "Say hi", "input": "", "output": "hi"}])
    write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Add\n\n2 and 2", "completion": "4"}])
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Say hi"},
                                                         {"role": "assistant", "content": "hi"}]}])
    cache = load_conversation_cache(tmp_path, BYTES, tmp_path / "cache", quiet=True)
    got = [cache.conversation(i)[0].tolist() for i in range(cache.num_conversations)]
    expected = [encode_conversation(BYTES, [{"role": "user", "content": u},
                                            {"role": "assistant", "content": a}])[0]
                for u, a in [("Add\n\n2 and 2", "4"), ("Say hi", "hi"), ("Say hi", "hi"), ("Add\n\n2 and 2", "4")]]
    assert [f.name for f in cache.files] == ["alpaca.jsonl", "chat.jsonl", "pc.jsonl"] and got == expected


def test_format_is_detected_per_file_and_data_format_forces_it(tmp_path):
    files = {"a.jsonl": {"messages": []}, "b.jsonl": {"instruction": "x", "output": "y"},
             "c.jsonl": {"prompt": "x", "completion": "y"}, "d.jsonl": {"text": "x"}}
    for name, record in files.items():
        write_jsonl(tmp_path / name, ["", record])  # detection skips empty lines
    (tmp_path / "e.txt").write_text("plain")
    assert [detect_data_format(tmp_path / n) for n in [*files, "e.txt"]] == [
        "chat", "alpaca", "prompt-completion", "text", "text"]
    assert detect_data_format(tmp_path / "d.jsonl", "chat") == "chat"
    assert is_chat_data(tmp_path) and not is_chat_data(tmp_path / "d.jsonl")
    assert not is_chat_data(tmp_path, data_format="text")
    write_jsonl(tmp_path / "odd.jsonl", [{"question": "?"}])
    with pytest.raises(DataError) as err:
        detect_data_format(tmp_path / "odd.jsonl")
    assert_one_line_error(err, f"{tmp_path / 'odd.jsonl'}:1:", "question", "--data-format")
    with pytest.raises(DataError) as err:
        detect_data_format(tmp_path / "a.jsonl", "sharegpt")
    assert_one_line_error(err, "'sharegpt'", "auto, chat, alpaca, prompt-completion, text")


def test_text_documents_in_a_chat_corpus_train_on_everything_but_bos(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [conversation(0, 3)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "plain words"}])
    cache = load_conversation_cache(tmp_path, BYTES, tmp_path / "cache", quiet=True)
    ids, labels = cache.conversation(1)
    assert ids.tolist() == BYTES.encode("plain words", bos=True, eos=True)
    assert labels.tolist() == [IGNORE_INDEX] + ids[1:].tolist()


GOOD = json.dumps(conversation(0, 2))
BAD_LINES = {
    "not_json": ("{'messages': []}", "not valid JSON"),
    "no_messages": ('{"conversation": []}', 'no "messages" field (keys: conversation)'),
    "unknown_role": ('{"messages": [{"role": "bot", "content": "x"}]}', "message 1 has unknown role 'bot'"),
    "content_not_str": ('{"messages": [{"role": "user", "content": ["x"]}]}', 'message 1 "content" is a JSON list'),
    "no_assistant": ('{"messages": [{"role": "user", "content": "x"}]}', "conversation has no assistant message"),
    "alpaca_no_output": ('{"instruction": "x"}', 'no "output" field'),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_is_an_error_naming_file_line_and_fix(tmp_path, case):
    line, reason = BAD_LINES[case]
    first = '{"instruction": "a", "output": "b"}' if case.startswith("alpaca") else GOOD
    path = write_jsonl(tmp_path / f"{case}.jsonl", [first, "", line])
    with pytest.raises(DataError) as err:
        load_conversation_cache(path, BYTES, tmp_path / "cache", quiet=True)
    assert_one_line_error(err, f"{path}:3: {reason}", "--skip-bad-lines")
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind


def test_no_assistant_turn_is_fine_when_training_on_all(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, BAD_LINES["no_assistant"][0]])
    assert load_conversation_cache(path, BYTES, tmp_path / "cache", train_on="all", quiet=True).num_conversations == 2
    with pytest.raises(DataError) as err:
        load_conversation_cache(path, BYTES, tmp_path / "cache", train_on="last", quiet=True)
    assert_one_line_error(err, f"{path}:2: conversation has no assistant message")


def test_skip_bad_lines_counts_skips_and_reports_one_line_per_file(tmp_path, capsys):
    lines = [GOOD, BAD_LINES["unknown_role"][0], GOOD, BAD_LINES["not_json"][0], BAD_LINES["no_assistant"][0]]
    write_jsonl(tmp_path / "x.jsonl", lines)
    write_jsonl(tmp_path / "y.jsonl", [GOOD])
    cache = load_conversation_cache(tmp_path, BYTES, tmp_path / "cache", skip_bad_lines=True, quiet=True)
    assert cache.num_conversations == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path / 'x.jsonl'}: skipped 3 bad lines "
                        "(first: line 2: message 1 has unknown role 'bot')"]


# ---------------------------------------------------------------------------
# Caches are keyed on content


def test_conversation_cache_holds_ids_and_labels_and_is_reused(tmp_path, monkeypatch):
    dialogs = [conversation(i, n)["messages"] for i, n in enumerate([3, 0, 7])]
    write_jsonl(tmp_path / "c.jsonl", [{"messages": d} for d in dialogs])
    first = load_conversation_cache(tmp_path / "c.jsonl", BYTES, tmp_path / "cache", quiet=True)
    assert not first.hit
    for i, d in enumerate(dialogs):
        ids, labels = first.conversation(i)
        assert (ids.tolist(), labels.tolist()) == encode_conversation(BYTES, d)
    with monkeypatch.context() as m:  # a hit must not encode anything
        m.setattr("llama.data.chat.encode_conversation", lambda *a, **k: pytest.fail("re-encoded on a hit"))
        second = load_conversation_cache(tmp_path / "c.jsonl", BYTES, tmp_path / "cache", quiet=True)
    assert second.hit and np.array_equal(second.mask, first.mask)
    last = load_conversation_cache(tmp_path / "c.jsonl", BYTES, tmp_path / "cache", train_on="last", quiet=True)
    assert not last.hit  # train_on changes the labels
    assert not load_conversation_cache(tmp_path / "c.jsonl", BYTES, tmp_path / "cache", data_format="chat",
                                       quiet=True).hit


def rewrite_keeping_size_and_mtime(path: Path, text: str) -> None:
    before = path.stat()
    assert len(text.encode()) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns


def test_token_cache_rebuilds_a_file_rewritten_with_same_size_and_mtime(tmp_path):
    (tmp_path / "a.txt").write_text("first version")
    load_token_cache(tmp_path / "a.txt", BYTES, tmp_path / "cache", quiet=True)
    rewrite_keeping_size_and_mtime(tmp_path / "a.txt", "other version")
    cache = load_token_cache(tmp_path / "a.txt", BYTES, tmp_path / "cache", quiet=True)
    assert not cache.hit and cache.document(0).tolist() == BYTES.encode("other version", bos=True, eos=True)


def test_conversation_cache_rebuilds_a_file_rewritten_with_same_size_and_mtime(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [conversation(0, 5)])
    load_conversation_cache(path, BYTES, tmp_path / "cache", quiet=True)
    rewrite_keeping_size_and_mtime(path, json.dumps(conversation(1, 5)) + "\n")
    cache = load_conversation_cache(path, BYTES, tmp_path / "cache", quiet=True)
    assert not cache.hit
    assert cache.conversation(0)[0].tolist() == encode_conversation(BYTES, conversation(1, 5)["messages"])[0]


# ---------------------------------------------------------------------------
# Packing whole conversations


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(30), 0.9, 5000).astype(int), 1, 101)
    items, offsets = pack_windows(lengths, capacity=101, seed=3)
    assert sorted(items.tolist()) == list(range(len(lengths)))
    fill = np.add.reduceat(lengths[items], offsets[:-1])
    assert fill.max() <= 101 and fill.sum() / (len(fill) * 101) > 0.97
    # best fit: no two windows could be merged into one
    assert np.sort(fill)[0] + np.sort(fill)[1] > 101
    again = pack_windows(lengths, capacity=101, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((items, offsets), again))


def cut_by_document(inputs, targets, doc_ids, pad_id: int) -> list[list[int]]:
    """A window's pieces by document id. The window's last token is only in the
    targets; with train_on="assistant" it is a trained <|eot_id|> or padding."""
    last = int(targets[-1]) if targets[-1] != IGNORE_INDEX else pad_id
    tokens, ids = np.append(inputs, last), np.append(doc_ids, doc_ids[-1] + (last == pad_id != inputs[-1]))
    return [tokens[ids == d].tolist() for d in range(int(ids.max()) + 1)]


def test_every_conversation_is_in_exactly_one_window_whole(tmp_path):
    rng = np.random.default_rng(1)
    cache = chat_cache(tmp_path, rng.integers(0, 25, size=60))  # all fit in a window
    ds = ChatDataset(cache, seq_len=63, seed=5)
    seen = []
    for w in range(ds.num_samples):
        convs = ds.conversations(w).tolist()
        pieces = cut_by_document(*ds.row(w), cache.pad_id)
        assert pieces[:len(convs)] == [cache.conversation(c)[0].tolist() for c in convs]
        assert all(t == cache.pad_id for piece in pieces[len(convs):] for t in piece)
        seen += convs
    assert sorted(seen) == list(range(cache.num_conversations)) and ds.num_truncated == 0
    assert ds.packing_efficiency == cache.offsets[-1] / (ds.num_samples * 64)


def test_each_conversation_appears_once_per_epoch_through_the_loader(tmp_path):
    cache = chat_cache(tmp_path, np.random.default_rng(2).integers(0, 25, size=50))  # all fit
    ds = ChatDataset(cache, seq_len=63, seed=5)
    everything = sorted(tuple(cache.conversation(c)[0].tolist()) for c in range(cache.num_conversations))
    loader = DistributedDataLoader(ds, global_batch=1)
    for epoch in range(2):
        seen = []
        for _ in range(ds.num_samples):
            batch = next(loader)
            assert batch.inputs.shape == batch.targets.shape == batch.document_ids.shape == (1, 63)
            pieces = cut_by_document(batch.inputs[0].numpy(), batch.targets[0].numpy(),
                                     batch.document_ids[0].numpy(), cache.pad_id)
            seen += [tuple(p) for p in pieces if p[0] == BYTES.bos_id]
        assert sorted(seen) == everything, f"epoch {epoch}"


def test_targets_are_exactly_the_assistant_labels_and_padding_and_bos_never_are(tmp_path):
    cache = chat_cache(tmp_path, [5, 9, 2, 30, 0, 11])
    ds = ChatDataset(cache, seq_len=95, seed=0)
    assert ds.num_truncated == 0 and ds.num_samples > 1
    for w in range(ds.num_samples):
        inputs, targets, doc_ids = ds.row(w)
        expected = []
        for c in ds.conversations(w).tolist():
            expected += cache.conversation(c)[1].tolist()
        expected += [IGNORE_INDEX] * (96 - len(expected))
        assert targets.tolist() == expected[1:]
        padding = doc_ids == doc_ids.max()
        if len(ds.conversations(w)) < doc_ids.max() + 1:  # the window has padding
            assert (targets[padding] == IGNORE_INDEX).all() and (inputs[padding] == cache.pad_id).all()
        bos_positions = np.flatnonzero(np.append(inputs, 0) == BYTES.bos_id)[1:]
        assert (targets[bos_positions - 1] == IGNORE_INDEX).all()  # never trained to predict a BOS


def test_long_conversation_is_truncated_at_the_end_and_counted_never_dropped(tmp_path):
    cache = chat_cache(tmp_path, [3, 200, 4, 33])  # 2 of 4 over 64 tokens, one just over
    ds = ChatDataset(cache, seq_len=63, seed=0)
    assert 64 < cache.offsets[4] - cache.offsets[3] < 70
    assert ds.num_truncated == 2
    for c in (1, 3):
        (w,) = [w for w in range(ds.num_samples) if c in ds.conversations(w).tolist()]
        inputs, targets, doc_ids = ds.row(w)
        ids, labels = cache.conversation(c)
        assert ds.conversations(w).tolist() == [c] and (doc_ids == 0).all()
        assert inputs.tolist() == ids[:63].tolist() and targets.tolist() == labels[1:64].tolist()
        sample = [ds.window_index(s) for s in range(ds.num_samples)].index(w)
        assert ds.num_targets(sample) == np.count_nonzero(labels[:64] != IGNORE_INDEX) > 0


def test_document_ids_start_at_zero_rise_by_one_at_each_conversation_and_padding_is_last(tmp_path):
    cache = chat_cache(tmp_path, np.random.default_rng(3).integers(0, 30, size=40))
    ds = ChatDataset(cache, seq_len=95, seed=2)
    batch = ds.get_batch(0, dp_rank=0, dp_size=1, micro_batch=ds.num_samples)
    assert batch.document_ids.dtype == torch.int64
    for row, inputs in zip(batch.document_ids, batch.inputs):
        steps = torch.diff(row)
        assert row[0] == 0 and ((steps == 0) | (steps == 1)).all()
        starts = torch.nonzero(steps).flatten() + 1
        assert (inputs[starts][inputs[starts] != cache.pad_id] == BYTES.bos_id).all()
        assert (inputs[1:][steps == 0] != BYTES.bos_id).all()  # a BOS only at a document start
        padding = inputs == cache.pad_id  # the byte tokenizer's <|pad|> never occurs in text
        assert (row[padding] == row.max()).all() and (row[~padding] < row.max()).all() == bool(padding.any())


def test_packing_does_not_depend_on_the_mesh_and_the_seed_shuffles_windows(tmp_path):
    cache = chat_cache(tmp_path, np.random.default_rng(4).integers(0, 30, size=40))
    a, b = ChatDataset(cache, seq_len=63, seed=9), ChatDataset(cache, seq_len=63, seed=9)
    rows = lambda ds: [ds.row(w) for w in range(ds.num_samples)]
    assert all(np.array_equal(x, y) for ra, rb in zip(rows(a), rows(b)) for x, y in zip(ra, rb))
    order = lambda ds: [ds.window_index(s) for s in range(ds.num_samples)]  # epoch 0's windows, as visited
    epoch = lambda ds: ds.get_batch(0, 0, 1, ds.num_samples).inputs  # and their samples
    other = ChatDataset(cache, seq_len=63, seed=10)
    assert order(a) == order(b) and torch.equal(epoch(a), epoch(b))  # the same seed twice: the same order
    assert order(a) != order(other) and not torch.equal(epoch(a), epoch(other))  # another seed: another order
    assert sorted(order(other)) == list(range(other.num_samples))  # every window once
    one = DistributedDataLoader(a, global_batch=4, dp_size=1)
    two = [DistributedDataLoader(b, global_batch=4, dp_rank=r, dp_size=2) for r in range(2)]
    assert torch.equal(next(one).inputs, torch.cat([next(loader).inputs for loader in two]))


# ---------------------------------------------------------------------------
# Exact target counts


def test_step_target_tokens_is_the_brute_force_count_over_all_ranks_and_micro_steps(tmp_path):
    # Answers from 0 to 40 characters: windows carry very uneven numbers of targets.
    cache = chat_cache(tmp_path, np.random.default_rng(5).integers(0, 40, size=80))
    ds = ChatDataset(cache, seq_len=63, seed=1)
    dp_size, grad_accum, global_batch = 2, 2, 8
    loaders = [DistributedDataLoader(ds, global_batch=global_batch, dp_rank=r, dp_size=dp_size,
                                     grad_accum=grad_accum) for r in range(dp_size)]
    counts = []
    for step in range(2 * ds.num_samples // global_batch + 1):  # crosses epoch boundaries
        predicted = [loader.step_target_tokens() for loader in loaders]
        seen = sum(int((next(loader).targets != IGNORE_INDEX).sum())
                   for _ in range(grad_accum) for loader in loaders)
        assert predicted == [seen] * dp_size, f"step {step}"
        counts.append(seen)
    assert len(set(counts)) > 1  # the masks really were uneven
    pretrain = DistributedDataLoader(PackedDataset(np.arange(100), seq_len=4), global_batch=6, dp_size=2)
    assert pretrain.step_target_tokens() == 6 * 4


# ---------------------------------------------------------------------------
# Pretraining windows: document ids and selected documents


def toy_corpus() -> tuple[np.ndarray, np.ndarray]:
    """Documents of lengths 5, 1, 9, 3, 12, 7: token t of the stream is t, so
    positions are easy to read back."""
    lengths = [5, 1, 9, 3, 12, 7]
    return np.arange(sum(lengths), dtype=np.uint32), np.concatenate([[0], np.cumsum(lengths)])


def test_pretraining_document_ids_are_window_local_from_doc_offsets():
    tokens, offsets = toy_corpus()
    ds = PackedDataset(tokens, seq_len=4, seed=0, document_masking=True, doc_offsets=offsets)
    doc_of = np.searchsorted(offsets, tokens, side="right") - 1  # brute force: which document each token is in
    for w in range(ds.num_samples):
        inputs, targets, doc_ids = ds.row(w)
        assert doc_ids.tolist() == (doc_of[inputs] - doc_of[inputs[0]]).tolist()
    assert ds.get_batch(0, 0, 1, 2).document_ids.shape == (2, 4)
    plain = PackedDataset(tokens, seq_len=4, document_masking=True)  # no offsets: one document
    assert not plain.get_batch(0, 0, 1, plain.num_samples).document_ids.any()
    assert PackedDataset(tokens, seq_len=4).get_batch(0, 0, 1, 3).document_ids is None


def test_pretraining_on_selected_documents_is_their_concatenation():
    tokens, offsets = toy_corpus()
    selected = np.array([0, 2, 4, 5])
    ds = PackedDataset(tokens, seq_len=4, seed=3, document_masking=True, doc_offsets=offsets, documents=selected)
    pieces = [tokens[offsets[d]:offsets[d + 1]] for d in selected]
    copied = PackedDataset(np.concatenate(pieces), seq_len=4, seed=3, document_masking=True,
                           doc_offsets=np.concatenate([[0], np.cumsum([len(p) for p in pieces])]))
    assert ds.num_samples == copied.num_samples == (33 - 1) // 4
    for w in range(ds.num_samples):
        assert all(np.array_equal(a, b) for a, b in zip(ds.row(w), copied.row(w))), f"window {w}"


def test_pretraining_on_a_token_cache_subset(tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.txt").write_text(f"document number {i} " * (i + 1))
    cache = load_token_cache(tmp_path, BYTES, tmp_path / "cache", quiet=True)
    train, val = split_documents(cache.num_docs, 0.34, seed=0)
    ds = PackedDataset(cache, seq_len=8, documents=val, document_masking=True)
    stream = np.concatenate([cache.document(d) for d in val])
    assert ds.num_tokens == len(stream)
    got = np.concatenate([ds.row(w)[0] for w in range(ds.num_samples)])
    assert np.array_equal(got, stream[:len(got)])


# ---------------------------------------------------------------------------
# Validation: held-out documents and fixed eval batches


def test_split_documents_holds_out_whole_documents_deterministically():
    train, val = split_documents(100, 0.1, seed=7)
    assert len(val) == 10 and sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert all(np.array_equal(a, b) for a, b in zip((train, val), split_documents(100, 0.1, seed=7)))
    assert not np.array_equal(val, split_documents(100, 0.1, seed=8)[1])
    assert len(split_documents(10, 0.01, seed=0)[1]) == 1  # at least one held out
    for num_docs, fraction in [(1, 0.5), (10, 0.95), (10, 0.0), (10, 1.0)]:
        with pytest.raises(DataError) as err:
            split_documents(num_docs, fraction, seed=0)
        assert_one_line_error(err, str(fraction))


@pytest.mark.parametrize("kind", ["chat", "pretraining"])
def test_eval_batches_cover_the_same_samples_on_any_dp_size(tmp_path, kind):
    if kind == "chat":
        ds = ChatDataset(chat_cache(tmp_path, np.random.default_rng(6).integers(0, 40, size=90)),
                         seq_len=63, seed=4)
    else:
        ds = PackedDataset(np.arange(40 * 8 + 1), seq_len=8, seed=4, document_masking=True,
                           doc_offsets=np.append(np.arange(0, 40 * 8 + 1, 7), 40 * 8 + 1))
    global_batch, num_batches = 8, 2

    def union(dp_size, grad_accum):
        micro = global_batch // (dp_size * grad_accum)
        rows = []
        for r in range(dp_size):
            for batch in eval_batches(ds, num_batches, global_batch, r, dp_size, micro):
                rows += [tuple(map(tuple, (i.tolist(), t.tolist(), d.tolist())))
                         for i, t, d in zip(batch.inputs, batch.targets, batch.document_ids)]
        return sorted(rows)

    reference = union(1, 1)
    first = ds.get_batch(0, dp_rank=0, dp_size=1, micro_batch=global_batch * num_batches)  # epoch 0's first
    assert reference == sorted(tuple(map(tuple, (i.tolist(), t.tolist(), d.tolist()))) for i, t, d in
                               zip(first.inputs, first.targets, first.document_ids))
    assert union(2, 1) == union(4, 1) == union(2, 2) == reference


def rows_of(batches) -> list:
    """Each row of the batches as a hashable (inputs, targets, document ids) tuple."""
    return [(tuple(i.tolist()), tuple(t.tolist()), None if d is None else tuple(d.tolist()))
            for b in batches for i, t, d in zip(b.inputs, b.targets,
                                                b.document_ids if b.document_ids is not None else [None] * len(b.inputs))]


@pytest.mark.parametrize("kind", ["chat", "pretraining", "pretraining without document ids"])
def test_eval_batches_pad_a_set_smaller_than_one_global_batch_with_ignored_rows(tmp_path, kind):
    """7 windows, global batch 8 (issue 21 item 8): every window once, on any dp size and
    accumulation, and one padding row: inputs 0, targets all ignored, document ids 0."""
    if kind == "chat":
        ds = ChatDataset(chat_cache(tmp_path, [40] * 7), seq_len=63, seed=4)  # one conversation per window
    else:
        ds = PackedDataset(np.arange(7 * 8 + 1), seq_len=8, seed=4, document_masking=kind == "pretraining",
                           doc_offsets=np.array([0, 20, 7 * 8 + 1]))
    assert ds.num_samples == 7
    windows = rows_of([ds.get_batch(0, dp_rank=0, dp_size=1, micro_batch=7)])  # epoch 0's order
    padding = (tuple([0] * ds.seq_len), tuple([IGNORE_INDEX] * ds.seq_len),
               None if kind == "pretraining without document ids" else tuple([0] * ds.seq_len))
    for dp_size, grad_accum in [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (8, 1)]:
        micro = 8 // (dp_size * grad_accum)
        rows = []
        for r in range(dp_size):
            batches = list(eval_batches(ds, 4, 8, r, dp_size, micro))
            assert len(batches) == grad_accum and all(len(b.inputs) == micro for b in batches)
            rows += rows_of(batches)
        assert sorted(rows, key=repr) == sorted(windows + [padding], key=repr), f"dp {dp_size} x accum {grad_accum}"
    last = list(eval_batches(ds, 1, 8, 1, 2, 4))[0]  # dp rank 1 of 2: samples 4-7, the last one padding
    assert rows_of([last])[:3] == windows[4:] and rows_of([last])[3] == padding
    assert int((last.targets != IGNORE_INDEX).sum()) == sum(ds.num_targets(s) for s in range(4, 7))


def test_eval_batches_use_every_window_up_to_eval_batches_global_batches(capsys):
    ds = PackedDataset(np.arange(10 * 4 + 1), seq_len=4)  # 10 windows

    def evaluated(num_batches, global_batch):
        batches = list(eval_batches(ds, num_batches, global_batch, dp_rank=0, dp_size=1, micro_batch=global_batch))
        real = [b.targets != IGNORE_INDEX for b in batches]
        return len(batches), int(sum(r.all(dim=1).sum() for r in real)), capsys.readouterr().err

    # more windows than --eval-batches global batches: exactly the first ones, as before
    assert evaluated(2, 4) == (2, 8, "")
    assert evaluated(5, 2) == (5, 10, "")
    # fewer: all 10, the last global batch padded; one warning line naming set, counts and padding
    count, real, said = evaluated(5, 4)
    assert (count, real) == (3, 10) and said.count("\n") == 1
    assert "token array: validation set has 10 windows" in said and "global batch 4" in said, said
    assert "evaluating all 10 in 3 global batches, the last padded with 2 rows the loss ignores" in said, said
    count, real, said = evaluated(1, 12)  # fewer than one global batch: evaluated, not refused
    assert (count, real) == (1, 10) and "padded with 2 rows" in said, said
    count, real, said = evaluated(6, 5)  # a whole number of global batches: nothing to pad
    assert (count, real) == (2, 10) and "in 2 global batches" in said and "padded" not in said, said
    with pytest.raises(DataError) as err:
        list(eval_batches(ds, 0, 4, dp_rank=0, dp_size=1, micro_batch=4))
    assert_one_line_error(err, "eval batches must be >= 1")


def test_chat_loader_state_resumes_like_the_pretraining_loader(tmp_path):
    ds = ChatDataset(chat_cache(tmp_path, np.random.default_rng(7).integers(0, 40, size=60)), seq_len=63)
    loader = DistributedDataLoader(ds, global_batch=2)
    for _ in range(3):
        next(loader)
    resumed = DistributedDataLoader(ds, global_batch=2)
    resumed.load_state_dict(loader.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(next(loader)[:3], next(resumed)[:3]))  # pair_ids: None

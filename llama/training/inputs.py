"""What a run reads: the training loader and the fixed validation batches, built from
text or chat data, with the batch cuts that data, context and pipeline parallelism make
checked before any work.

Rank 0 tokenizes (or finds the token cache) while the other ranks wait; then every rank
opens the cache it names."""

import datetime
from dataclasses import dataclass
from typing import Optional

from llama.config import ModelArgs
from llama.data.chat import is_chat_data
from llama.data.chat_cache import load_conversation_cache, open_conversation_cache
from llama.data.chat_packing import ChatDataset
from llama.data.files import default_corpus_paths
from llama.data.loader import DistributedDataLoader, eval_batches, eval_windows, split_documents
from llama.data.packed import PackedDataset
from llama.data.pair_cache import load_pair_cache, open_pair_cache
from llama.data.pair_dataset import PairDataset
from llama.data.token_cache import load_token_cache, open_token_cache
from parallel.context import check_cp_divides, check_sequence_parallel_divides
from parallel.control import rank0_first
from parallel.mesh import dp_rank, dp_size
from parallel.pipeline import PipelineConfig, check_pipeline

DATA_PREP_TIMEOUT = datetime.timedelta(hours=24)  # how long ranks wait for rank 0 to tokenize


def batch_layout(opts, args: ModelArgs, dp: int) -> int:
    """The global batch, after checking the sequence and batch cuts that context and
    pipeline parallelism make, before any work: one line naming the flags. As in the
    planner, --micro-batch is the sequences of one forward: of one pipeline micro-batch
    under --pp, so that a dp rank runs micro-batch x --pp-microbatches sequences through
    the schedule per micro-step."""
    check_cp_divides(opts.seq_len, opts.cp)
    check_sequence_parallel_divides(opts.seq_len, opts.cp, opts.tp, opts.sequence_parallel)
    microbatches = check_pipeline(args, opts.pp, PipelineConfig.from_options(opts))
    global_batch = opts.global_batch or opts.micro_batch * microbatches * dp * opts.grad_accum
    rows = global_batch // (dp * opts.grad_accum)
    if opts.pp > 1 and rows % microbatches:
        raise ValueError(
            f"each dp rank's {rows} sequences per micro-step (--global-batch / (dp {dp} x --grad-accum "
            f"{opts.grad_accum})) must be divisible by --pp-microbatches {microbatches}: the pipeline cuts them "
            "into that many"
        )
    return global_batch



@dataclass
class TrainingData:
    loader: DistributedDataLoader
    validation: list  # this rank's Batches of the fixed validation set; empty without one
    summary: list  # start-up lines about the data
    # preference pairs (--objective dpo): what the reference pass reads and keys its table by
    train_set: object = None
    pair_count: int = 0  # training and validation pairs; validation pair ids follow the training ones
    pair_keys: Optional[dict] = None


def build_data(opts, tokenizer, mesh, global_batch: int, vocab_size: Optional[int] = None) -> TrainingData:
    """The training loader and the validation batches. Chat and instruction data are
    packed whole conversations per window; text is cut into stride windows; preference
    pairs (--objective dpo) are two rows each."""
    if opts.objective == "dpo":
        return build_pair_data(opts, tokenizer, mesh, global_batch, vocab_size)
    sources = opts.data or default_corpus_paths()
    chat = is_chat_data(sources, opts.data_format)

    def load(paths):
        if chat:
            return load_conversation_cache(
                paths, tokenizer, opts.cache_dir, data_format=opts.data_format, train_on=opts.train_on,
                skip_bad_lines=opts.skip_bad_lines,
            )
        return load_token_cache(paths, tokenizer, opts.cache_dir)

    def reopen(path, paths):  # rank 0's cache, without hashing every source file again
        return open_conversation_cache(path, paths) if chat else open_token_cache(path, paths)

    def dataset(cache, documents=None):
        if chat:
            return ChatDataset(cache, opts.seq_len, seed=opts.seed, documents=documents)
        return PackedDataset(
            cache, opts.seq_len, seed=opts.seed, document_masking=opts.document_masking, documents=documents
        )

    def tokenize():
        return [load(paths).path if paths else None for paths in (sources, opts.val_data)]

    # Rank 0 tokenizes (or finds the cache) while the others wait on a gloo group with a
    # timeout of hours, not the collectives' (python -m llama.data prepare does it ahead
    # of time); then they open the cache it names.
    cache_path, val_cache_path = rank0_first(tokenize, DATA_PREP_TIMEOUT)
    cache = reopen(cache_path, sources)
    if vocab_size is not None:
        check_token_ids(cache.max_token_id, vocab_size, f"the token cache of {sources[0]}")
    train_docs = val_set = None
    if opts.val_fraction:
        train_docs, val_docs = split_documents(cache.num_docs, opts.val_fraction, opts.seed)
        val_set = dataset(cache, val_docs)
    elif opts.val_data:
        val_cache = reopen(val_cache_path, opts.val_data)
        if vocab_size is not None:
            check_token_ids(val_cache.max_token_id, vocab_size, f"the token cache of {opts.val_data[0]}")
        val_set = dataset(val_cache)
    train_set = dataset(cache, train_docs)
    loader = DistributedDataLoader(
        train_set, global_batch=global_batch, dp_rank=dp_rank(mesh), dp_size=dp_size(mesh), grad_accum=opts.grad_accum
    )
    validation = []
    if val_set is not None:
        validation = list(
            eval_batches(val_set, opts.eval_batches, global_batch, dp_rank(mesh), dp_size(mesh), loader.micro_batch)
        )
    summary = []
    for name, ds in (("train", train_set), ("validation", val_set)):
        if isinstance(ds, ChatDataset):
            summary.append(
                f"{name}: packed {ds.num_tokens:,} tokens into {ds.num_samples:,} windows of {opts.seq_len + 1}: "
                f"{100 * ds.packing_efficiency:.1f}% packing efficiency, {ds.num_truncated} conversations truncated"
            )
    if val_set is not None:
        samples = eval_windows(val_set.num_samples, opts.eval_batches, global_batch)  # real: padding not counted
        summary.append(f"validation: a fixed set of {samples} windows of {val_set.name}, evaluated every {opts.eval_every} steps")
    return TrainingData(loader, validation, summary)


def check_token_ids(max_token_id: int, vocab_size: int, what: str) -> None:
    """Once at start-up: the model's forward does not check id values (that would wait for
    the device every step). The caches record their largest id when they are built."""
    if max_token_id >= vocab_size:
        raise ValueError(
            f"{what} holds token id {max_token_id} but the model's vocabulary is {vocab_size}: "
            "use the --tokenizer the --checkpoint was trained with, or delete the stale cache (--cache-dir)"
        )


def build_pair_data(opts, tokenizer, mesh, global_batch: int, vocab_size: Optional[int] = None) -> TrainingData:
    """DPO's loader and validation batches: `global_batch` pairs a step, each pair its chosen
    and its rejected sequence, whole, padded to --seq-len (a pair that does not fit is
    dropped and counted, never cut: a cut reply has another log-probability)."""
    if not opts.data:
        raise ValueError("--objective dpo needs --data: .jsonl preference pairs {\"prompt\", \"chosen\", \"rejected\"}")

    def load(paths):
        return load_pair_cache(paths, tokenizer, opts.cache_dir, data_format=opts.data_format,
                               skip_bad_lines=opts.skip_bad_lines)

    cache_path, val_cache_path = rank0_first(lambda: [load(p).path if p else None for p in (opts.data, opts.val_data)],
                                             DATA_PREP_TIMEOUT)
    cache = open_pair_cache(cache_path, opts.data)
    caches = [(cache, opts.data[0])]
    train_docs = val_set = None
    if opts.val_fraction:
        train_docs, val_docs = split_documents(cache.num_docs, opts.val_fraction, opts.seed)
    train_set = PairDataset(cache, opts.seq_len, seed=opts.seed, documents=train_docs)
    if opts.val_fraction:
        val_set = PairDataset(cache, opts.seq_len, seed=opts.seed, documents=val_docs, id_offset=train_set.num_samples)
    elif opts.val_data:
        val_cache = open_pair_cache(val_cache_path, opts.val_data)
        caches.append((val_cache, opts.val_data[0]))
        val_set = PairDataset(val_cache, opts.seq_len, seed=opts.seed, id_offset=train_set.num_samples)
    if vocab_size is not None:
        for c, source in caches:
            check_token_ids(c.max_token_id, vocab_size, f"the pair cache of {source}")
    loader = DistributedDataLoader(
        train_set, global_batch=global_batch, dp_rank=dp_rank(mesh), dp_size=dp_size(mesh), grad_accum=opts.grad_accum
    )
    validation, summary = [], [train_set.summary("train")]
    if val_set is not None:
        validation = list(
            eval_batches(val_set, opts.eval_batches, global_batch, dp_rank(mesh), dp_size(mesh), loader.micro_batch)
        )
        pairs = eval_windows(val_set.num_samples, opts.eval_batches, global_batch)
        summary += [val_set.summary("validation"),
                    f"validation: a fixed set of {pairs} pairs of {val_set.name}, evaluated every {opts.eval_every} steps"]
    return TrainingData(
        loader, validation, summary, train_set=train_set,
        pair_count=train_set.num_samples + (0 if val_set is None else val_set.num_samples),
        pair_keys={"train": cache.key, "val": None if not opts.val_data else caches[1][0].key},
    )

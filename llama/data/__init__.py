"""Training data: files read into token caches on disk, cut into windows, served as data-parallel batches.

Pretraining text goes through `load_token_cache` (one uint32 memmap of every
document's tokens) into `PackedDataset` (stride-packed windows of seq_len + 1
tokens); chat and instruction data through `load_conversation_cache` (tokens
and a loss mask) into `ChatDataset` (whole conversations per window, padded);
preference pairs for DPO through `load_pair_cache` into `PairDataset` (one pair
a sample, its chosen and rejected sequences two rows of one micro-batch).
Each feeds `DistributedDataLoader`, whose state is one global sample counter,
so a run resumes on any number of dp ranks. `python -m llama.data prepare`
builds the caches ahead of training, on every core.

The modules, from the bottom:

    errors        DataError, and the warning lines on stderr
    files         finding data files, reading them in parts of whole lines, their text documents
    workers       encoding chunks in a thread or in worker processes, results in corpus order
    progress      a cache build's progress on stderr, and its summary line
    token_cache   the pretraining token cache, and what the conversation cache shares with it
    windows       WindowDataset: windows in a seeded order per epoch, Batch, IGNORE_INDEX
    packed        PackedDataset: pretraining windows over the token stream
    loader        DistributedDataLoader, the validation split and evaluation batches
    chat          chat / alpaca / prompt-completion records, encode_conversation with loss labels
    chat_cache    the conversation cache
    chat_packing  pack_windows and ChatDataset: whole conversations per window
    preference    {"prompt", "chosen", "rejected"} records, encode_pair: each reply as SFT encodes it
    pair_cache    the pair cache: two sequences a pair, in the conversation cache's storage
    pair_dataset  PairDataset: a pair per sample, two rows per pair, reference_batches
    cli           python -m llama.data prepare

Bad input raises `DataError` (a ValueError) with one line naming the file, the
line and the fix. Invalid UTF-8 is not an error: it is replaced with U+FFFD,
counted, and reported as a warning line on stderr.

The names below are re-exported for the import paths that predate the package
(`from llama.data import encode_conversation`); the project's own code imports
them from the module that defines them, and a test patches them there.
"""

from llama.data.chat import (
    DATA_FORMATS, TRAIN_ON, detect_data_format, encode_conversation, is_chat_data, is_preference_data)
from llama.data.chat_cache import ConversationCache, load_conversation_cache, open_conversation_cache
from llama.data.chat_packing import ChatDataset, pack_windows
from llama.data.cli import main, prepare
from llama.data.errors import DataError
from llama.data.files import (
    JSONL_SUFFIXES, FilePart, PathLike, Sources, chunks_of_parts, default_corpus_paths, find_source_files,
    part_documents, read_parts)
from llama.data.loader import DistributedDataLoader, eval_batches, eval_windows, micro_batch_size, split_documents
from llama.data.packed import PackedDataset
from llama.data.pair_cache import PairCache, load_pair_cache, open_pair_cache
from llama.data.pair_dataset import PairDataset
from llama.data.preference import encode_pair
from llama.data.progress import Progress
from llama.data.token_cache import (
    TokenCache, default_cache_dir, file_sha256, largest_token_id, load_token_cache, open_built_cache,
    open_token_cache, source_stats)
from llama.data.windows import IGNORE_INDEX, Batch, Permutation, Row, WindowDataset
from llama.data.workers import map_in_order, useful_workers

__all__ = [
    "Batch", "ChatDataset", "ConversationCache", "DATA_FORMATS", "DataError", "DistributedDataLoader", "FilePart",
    "IGNORE_INDEX", "JSONL_SUFFIXES", "PackedDataset", "PairCache", "PairDataset", "PathLike", "Permutation",
    "Progress", "Row", "Sources", "TRAIN_ON", "TokenCache", "WindowDataset", "chunks_of_parts", "default_cache_dir",
    "default_corpus_paths", "detect_data_format", "encode_conversation", "encode_pair", "eval_batches",
    "eval_windows", "file_sha256", "find_source_files", "is_chat_data", "is_preference_data", "largest_token_id",
    "load_conversation_cache", "load_pair_cache", "load_token_cache", "main", "map_in_order", "micro_batch_size",
    "open_built_cache", "open_conversation_cache", "open_pair_cache", "open_token_cache", "pack_windows",
    "part_documents", "prepare", "read_parts", "source_stats", "split_documents", "useful_workers",
]

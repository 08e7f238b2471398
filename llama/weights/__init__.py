"""Checkpoint formats: reading any Llama checkpoint, writing ours, loading one into a model.

  safetensors_io  safetensors files by pread and streaming writes, no mmap
  names           our tensor names (the model's), Hugging Face's, the RoPE permutation
  source          a checkpoint as a stream of named tensors (Source), checked against its config
  format          our converted format: model_args.json, the index, save_checkpoint, ours_source
  hf, meta, dcp   the readers of Hugging Face, Meta and training (DCP) checkpoints
  kinds           open_source: any checkpoint directory, its kind told by its files
  loading         load_model, load_weights_, verify_checkpoint

The names below keep `from llama.weights import ...` working as it did when this was one
module (with llama/sources.py beside it). The project itself imports each name from the
module that defines it, and so should anything that patches one: patching a name here
changes nothing the code uses. BAND_BYTES and MAX_HOLE_BYTES, the read-grouping knobs,
are not re-exported for that reason: set them in llama.weights.safetensors_io.
"""

from .dcp import is_training_checkpoint
from .format import (
    ARGS_FILE,
    FORMAT,
    INDEX_FILE,
    SINGLE_FILE,
    read_checkpoint_meta,
    read_model_args,
    save_checkpoint,
    weight_map,
    write_model_args,
)
from .kinds import open_source
from .loading import load_model, load_weights_, verify_checkpoint
from .names import expected_shapes, expected_tensors, meta_to_hf_rope, rope_heads, to_hf_name
from .safetensors_io import (
    DTYPE_CODES,
    DTYPES,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    SafetensorsWriter,
    TensorInfo,
    copy_file,
    header_bytes,
    nbytes_of,
    read_block_,
    read_header,
    read_tensor,
    tensor_bytes,
)
from .source import Source, SourceTensor, check_source

__all__ = [
    # loading
    "load_model", "load_weights_", "verify_checkpoint", "is_training_checkpoint",
    # our format
    "FORMAT", "ARGS_FILE", "INDEX_FILE", "SINGLE_FILE", "read_model_args", "read_checkpoint_meta",
    "write_model_args", "weight_map", "save_checkpoint",
    # names
    "expected_tensors", "expected_shapes", "to_hf_name", "rope_heads", "meta_to_hf_rope",
    # sources
    "Source", "SourceTensor", "open_source", "check_source",
    # safetensors
    "DTYPES", "DTYPE_CODES", "MAX_HEADER_BYTES", "TensorInfo", "SafetensorsHeader", "nbytes_of", "read_header",
    "read_tensor", "read_block_", "tensor_bytes", "header_bytes", "SafetensorsWriter", "copy_file",
]

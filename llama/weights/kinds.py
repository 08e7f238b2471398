"""Which kind of checkpoint a directory holds, told by its files, and open_source, which
reads it with that kind's reader:
  .metadata                                        DCP training checkpoint  dcp.py
  model_args.json + *.safetensors                  converted (ours)         format.py
  config.json + *.safetensors [+ index]            Hugging Face             hf.py
  params.json + consolidated.NN.pth                Meta's original          meta.py
"""

from pathlib import Path
from typing import Optional

from .dcp import dcp_source
from .format import ARGS_FILE, ours_source
from .hf import hf_source
from .meta import meta_source
from .source import Source


def open_source(
    path: Path, tie_word_embeddings: Optional[bool] = None, rope_scale_factor: Optional[float] = None
) -> Source:
    """`tie_word_embeddings`, `rope_scale_factor`: the user's word on what a Meta
    checkpoint's params.json may not say (convert_weights.py's flags); other kinds ignore them."""
    if not path.exists():
        raise ValueError(f"{path}: does not exist")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory; SRC is a checkpoint directory")
    if (path / ".metadata").is_file():
        return dcp_source(path)
    if (path / ARGS_FILE).is_file():
        return ours_source(path)
    if (path / "config.json").exists() or any(path.glob("*.safetensors")):
        return hf_source(path)
    if (path / "params.json").exists() or any(path.glob("consolidated.*.pth")):
        return meta_source(path, tie_word_embeddings, rope_scale_factor)
    if not any(path.iterdir()):
        raise ValueError(f"{path}: empty directory; expected a checkpoint")
    raise ValueError(
        f"{path}: no checkpoint found: expected config.json + *.safetensors (Hugging Face), "
        f"params.json + consolidated.NN.pth (Meta), {ARGS_FILE} (converted) or .metadata (DCP)"
    )

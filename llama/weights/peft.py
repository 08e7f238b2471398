"""LoRA adapters out of a run: a LoRA run's checkpoint read as its adapters, the fingerprint
that ties it to its base, the PEFT adapter format, and the base with the adapters merged in.

A LoRA run's checkpoint (train.py --lora-rank R, a DCP step_N) holds the adapters only,
under `model.<layer>.lora_a` / `.lora_b` in our names and Meta's RoPE layout, beside their
optimizer state; its trainer.json holds the run's flags (the LoRA config comes from them)
and `base`: the base checkpoint's path and fingerprint.

The PEFT format (what `PeftModel.from_pretrained(hf_model, DIR)` and vLLM read):
  adapter_model.safetensors  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight (r, in)
                             ... .lora_B.weight (out, r); mlp.{gate,up,down}_proj likewise
  adapter_config.json        peft_type LORA, r, lora_alpha, target_modules (HF names), ...
HF's q/k rows are Meta's permuted per head (names.meta_to_hf_rope), so B of wq and wk, whose
rows are those output rows, gets the weight's permutation; A (rank x input) does not.
"""

import hashlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from ..config import ModelArgs
from ..lora import LoRAConfig, is_adapter
from .format import ARGS_FILE, INDEX_FILE, weight_map
from .names import hf_to_meta_rope, meta_to_hf_rope, rope_heads, to_hf_name
from .safetensors_io import MAX_HEADER_BYTES, SafetensorsWriter
from .source import Source, SourceTensor, check_source

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
FACTORS = {".lora_a": "lora_A", ".lora_b": "lora_B"}

# ---------------------------------------------------------------- the base's fingerprint


SAMPLE_BYTES = 4096  # of each tensor's start, into the fingerprint


def base_fingerprint(path) -> str:
    """sha256 over what tells one base from another without reading it all: model_args.json,
    the index, every safetensors file's name and header (each tensor's name, dtype, shape,
    offsets), and the first SAMPLE_BYTES of every tensor's data; for a DCP checkpoint its
    .metadata. The headers alone would not do: two models of one architecture (a base and
    its instruct tune, two seeds) have identical headers. A few KB a tensor, so 405B's
    ~1,100 tensors take milliseconds, not the hour a hash of 800 GB would. A change that
    leaves every tensor's first 4 KB alone goes unseen: no fine-tune does that."""
    from .safetensors_io import read_header

    path = Path(path)
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}:{len(data)}:".encode())
        digest.update(data)

    add(ARGS_FILE, (path / ARGS_FILE).read_bytes())
    if (path / ".metadata").is_file():
        add(".metadata", (path / ".metadata").read_bytes())
        return digest.hexdigest()
    if (path / INDEX_FILE).is_file():
        add(INDEX_FILE, (path / INDEX_FILE).read_bytes())
    for file in sorted(set(weight_map(path).values())):
        header = read_header(file)
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"{file}: header of {n} bytes; not a safetensors file")
            add(file.name, f.read(n))
            for name, info in header.tensors.items():
                f.seek(info.start)
                add(name, f.read(min(SAMPLE_BYTES, info.end - info.start)))
    return digest.hexdigest()


def random_base_fingerprint(args: ModelArgs, seed: int) -> str:
    """A base drawn by Transformer.init_weights(seed): its model args and seed say it all
    (the draw is the same on any mesh)."""
    return hashlib.sha256(json.dumps({"model_args": args.to_dict(), "seed": seed}, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- a LoRA run's checkpoint


@dataclass
class RunAdapters:
    """The adapters of a LoRA run's checkpoint: where, for which model, with which config
    and base, and the stored shapes (our names -> shape), read one at a time."""

    path: Path
    args: ModelArgs
    lora: LoRAConfig
    base: dict  # {"checkpoint": path or None, "fingerprint": ..., "seed": ...}
    shapes: dict
    dtypes: dict  # our names -> stored dtype (the fp32 master copies under bf16 training)

    def read(self, name: str) -> torch.Tensor:
        from .dcp import _read_dcp

        return _read_dcp(self.path, f"model.{name}", self.shapes[name], self.dtypes[name])

    def check_base(self, base) -> Path:
        """`base` (None: the recorded one) is the base this run trained on; returns it."""
        recorded = self.base.get("checkpoint")
        if base is None and recorded is None:
            raise ValueError(
                f"{self.path}: the run's base was drawn at random (--seed {self.base.get('seed')}, no --checkpoint); "
                "there are no base weights to apply its adapters to"
            )
        base = Path(base if base is not None else recorded)
        if not (base / ARGS_FILE).is_file():
            raise ValueError(f"{base}: no {ARGS_FILE}; the base of {self.path} is the converted checkpoint {recorded}")
        found = base_fingerprint(base)
        if found != self.base.get("fingerprint"):
            raise ValueError(
                f"{base}: not the base the adapters of {self.path} were trained on (that was {recorded}, fingerprint "
                f"{str(self.base.get('fingerprint'))[:12]}; this one's is {found[:12]}); pass the run's own base "
                "checkpoint"
            )
        return base


def lora_config_of(path: Path, run_args: dict) -> LoRAConfig:
    """The LoRA config of a run's recorded flags (trainer.json's args)."""
    if not run_args.get("lora_rank"):
        raise ValueError(
            f"{path}: not a LoRA run's checkpoint (its trainer.json has no --lora-rank); it holds the whole model: "
            "export it with convert_weights.py --to-hf"
        )
    names = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_rslora")
    defaults = {"lora_alpha": None, "lora_dropout": 0.0, "lora_targets": "wq,wk,wv,wo,w1,w2,w3", "lora_rslora": False}
    return LoRAConfig.from_options(SimpleNamespace(**{n: run_args.get(n, defaults.get(n)) for n in names}))


def open_run(path) -> RunAdapters:
    """A LoRA run's checkpoint (RUN/step_N), checked: its trainer.json says it is one, and it
    holds exactly the adapters its config implies, in their shapes."""
    from torch.distributed.checkpoint import FileSystemReader

    from .format import read_model_args

    path = Path(path)
    trainer_file = path / "trainer.json"
    if not (path / ".metadata").is_file() or not trainer_file.is_file():
        raise ValueError(f"{path}: not a training checkpoint (train.py's SAVE_DIR/step_N: .metadata and trainer.json)")
    trainer = json.loads(trainer_file.read_text())
    lora = lora_config_of(path, trainer.get("args", {}))
    args = read_model_args(path)
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    entries = {k[len("model."):]: v for k, v in stored.items() if k.startswith("model.") and is_adapter(k)}
    shapes = {name: tuple(entry.size) for name, entry in entries.items()}
    check_adapter_shapes(path, shapes, expected_adapter_shapes(args, lora), lora)
    dtypes = {name: entry.properties.dtype for name, entry in entries.items()}
    return RunAdapters(path, args, lora, trainer.get("base") or {}, shapes, dtypes)


def expected_adapter_shapes(args: ModelArgs, lora: LoRAConfig) -> dict:
    """Adapter name -> shape that `lora` gives the model of `args`; nothing is allocated."""
    from ..lora import add_adapters
    from ..model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
        add_adapters(model, lora)
    return {name: tuple(p.shape) for name, p in model.named_parameters() if is_adapter(name)}


def check_adapter_shapes(path: Path, stored: dict, expected: dict, lora: LoRAConfig) -> None:
    """One clear error for adapters that are not those of the config: a rank that does not
    match, a target the model lacks, one missing."""
    for name, shape in stored.items():
        if name not in expected:
            layer = name.rsplit(".", 1)[0]
            raise ValueError(
                f"{path}: adapter {name}: the model has no adapted layer {layer} (--lora-targets "
                f"{','.join(lora.targets)}); the adapters belong to another model or config"
            )
        if shape != expected[name]:
            raise ValueError(
                f"{path}: adapter {name} has shape {list(shape)}, --lora-rank {lora.rank} wants "
                f"{list(expected[name])}: the stored rank does not match the run's recorded --lora-rank"
            )
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise ValueError(f"{path}: adapter {missing[0]} missing ({len(missing)} missing; --lora-targets "
                         f"{','.join(lora.targets)})")


# ---------------------------------------------------------------- PEFT names and layout


def to_peft_name(name: str) -> str:
    """layers.0.attention.wq.lora_a -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    layer, suffix = name[: -len(".lora_a")], name[-len(".lora_a"):]
    hf_layer = to_hf_name(f"{layer}.weight").removesuffix(".weight")
    return f"{PEFT_PREFIX}{hf_layer}.{FACTORS[suffix]}.weight"


def adapter_rope_heads(name: str, args: ModelArgs) -> Optional[int]:
    """Heads whose rows B of wq / wk permutes between Meta's and HF's RoPE layouts; None for A
    and every other adapter."""
    if not name.endswith(".lora_b"):
        return None
    return rope_heads(name[: -len(".lora_b")] + ".weight", args)


def to_peft(adapters: dict, args: ModelArgs) -> dict:
    """Our adapters (names and Meta's layout) -> PEFT's names and HF's layout."""
    out = {}
    for name, tensor in adapters.items():
        heads = adapter_rope_heads(name, args)
        out[to_peft_name(name)] = meta_to_hf_rope(tensor, heads) if heads else tensor
    return out


def from_peft(tensors: dict, args: ModelArgs, names) -> dict:
    """The way back, for our adapter `names`: PEFT's names and HF's layout -> ours."""
    out = {}
    for name in names:
        tensor = tensors[to_peft_name(name)]
        heads = adapter_rope_heads(name, args)
        out[name] = hf_to_meta_rope(tensor, heads) if heads else tensor
    return out


def peft_config(run: RunAdapters, base_name: str) -> dict:
    layers = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
              "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": run.lora.rank,
        "lora_alpha": int(alpha) if (alpha := run.lora.lora_alpha).is_integer() else alpha,
        "lora_dropout": run.lora.dropout,
        "target_modules": [layers[t] for t in run.lora.targets],
        "bias": "none",
        "use_rslora": run.lora.rslora,
        "fan_in_fan_out": False,  # A and B are stored (out, in) like torch.nn.Linear's weight
        "inference_mode": True,
    }


def write_peft(run: RunAdapters, out_dir: Path, base_name: Optional[str] = None,
               dtype: Optional[torch.dtype] = None) -> int:
    """adapter_model.safetensors and adapter_config.json of the run into out_dir; returns
    the bytes of tensors written. base_name: the config's base_model_name_or_path (default:
    the HF name the base was converted from, else the recorded base path); dtype: of the
    written factors (default: as stored, the fp32 master copies)."""
    tensors = to_peft({name: run.read(name).to(dtype or run.dtypes[name]) for name in run.shapes}, run.args)
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsWriter(out_dir / ADAPTER_FILE, specs, {"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor.contiguous())
    if base_name is None:
        base_name = _hf_name_of(run.base.get("checkpoint")) or str(run.base.get("checkpoint"))
    config = peft_config(run, base_name)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _hf_name_of(base: Optional[str]) -> Optional[str]:
    """The name the base's HF config.json had (`_name_or_path`), kept by the conversion."""
    if base is None or not (Path(base) / ARGS_FILE).is_file():
        return None
    hf = (json.loads((Path(base) / ARGS_FILE).read_text()).get("hf") or {}).get("config") or {}
    return hf.get("_name_or_path") or None


# ---------------------------------------------------------------- merged into the base


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A, computed in fp32 and returned in W's dtype."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def merged_source(run: RunAdapters, base: Source) -> Source:
    """`base` (the run's base as a Source, checked) with every adapted weight replaced by
    W + scale * B A, each merged only when it is written."""
    check_source(base)
    layers = sorted({name[: -len(".lora_a")] for name in run.shapes})
    for layer in layers:
        weight = base.tensors[f"{layer}.weight"]
        read = partial(_read_merged, weight.read, partial(run.read, f"{layer}.lora_a"),
                       partial(run.read, f"{layer}.lora_b"), run.lora.scale)
        where = f"{weight.where} + LoRA of {run.path}"
        base.tensors[weight.name] = SourceTensor(weight.name, weight.dtype, weight.shape, read, where)
    return base


def _read_merged(read_weight, read_a, read_b, scale: float) -> torch.Tensor:
    return merge(read_weight(), read_a(), read_b(), scale)

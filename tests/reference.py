"""Meta's reference Llama 3 (llama-models + fairscale), the test oracle. Call only inside a
`run_on_ranks` worker: fairscale needs an initialised process group."""

import torch

from llama import ModelArgs


def meta_reference_model(args: ModelArgs, state_dict: dict, max_batch_size: int):
    """Meta's `Transformer` (model parallel size 1) holding `state_dict` (Meta names).
    Its RoPE scaling hard-codes factor 8, low/high 1/4 and context 8192: give it
    configs with those values."""
    import fairscale.nn.model_parallel.initialize as fs_init
    from llama_models.llama3.args import ModelArgs as MetaArgs
    from llama_models.llama3.model import Transformer as MetaTransformer

    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    meta_args = MetaArgs(
        dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
        vocab_size=args.vocab_size, multiple_of=args.multiple_of, ffn_dim_multiplier=args.ffn_dim_multiplier,
        norm_eps=args.norm_eps, rope_theta=args.rope_theta, use_scaled_rope=args.use_scaled_rope,
        max_batch_size=max_batch_size, max_seq_len=args.max_seq_len,
    )
    state = dict(state_dict)
    state.setdefault("output.weight", state["tok_embeddings.weight"])  # tied models store one matrix
    reference = MetaTransformer(meta_args)
    reference.load_state_dict(state, strict=True)
    return reference

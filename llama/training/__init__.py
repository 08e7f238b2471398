"""The run: what train.py's loop is made of, one module per concern.

    flags        train.py's flags and --config           build       mesh, device, model, trainee
    inputs       the loader and validation batches       objective   what a step optimises
    step         one optimizer step, the run's state     optim       AdamW and the lr schedule
    evaluation   validation and its cadence              step_log    the log line, metrics rows, tokens/s
    checkpoint   atomic, rank-agreed checkpoints         preemption  signals and the time limit
    metrics      metrics.jsonl, TensorBoard, profiler    run_config  --config TOML in, config.toml out

Each component decides its own cadence (when to save, validate, log, agree on stopping),
so that train.py's loop reads in one screen. Nothing below this package imports it: the
model, formats and data (llama/) and the parallel library (parallel/) know nothing of a
run (tests/test_layering.py)."""

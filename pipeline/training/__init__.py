"""E2Style training: multi-stage encoders with the paper's losses, on one device, on local DDP processes, or
under Ray Train (DDP). One module per job:

    config.py    the typed, frozen training config (YAML + --set, validation naming the dotted key)
    paths.py     the per-stage output layout, and the check of every file a run needs before it starts
    data.py      synthetic (w, G(w)) pairs and image datasets, deterministic per seed, stage, step, rank
    model.py     the stage-k model (earlier stages frozen), its forward, validation, checkpoints
    loop.py      train_stage / run_training: one rank's loop, resume, validation, logging
    metrics.py   metrics.jsonl and TensorBoard event files (the steps' bar: pipeline/progress.py)
    ddp.py       local DDP on this machine's processes, without Ray
    cli.py       the command line (``run_pipeline.py train``, ``python -m pipeline.training``)

The Ray Train wrapper is workers/train_worker.py.
"""

"""The trainer: streaming loader, DeepSpeed engine, loop, checkpoints, logging.

    config.py         typed config schema, YAML + dotted overrides
    data.py           webdataset loader over train (cached targets) or image (online teacher) shards
    engine.py         process group, DeepSpeed engine, optimizer, LR schedule, safe checkpoint loading
    loop.py           train_one_step and run (the function every entry point calls)
    checkpointing.py  self-describing checkpoints and exact resume
    monitor.py        progress line, TensorBoard, log.jsonl, MFU
    main.py           `python -m eva.train --config CONFIG.yaml [dotted.key=value ...]`

Import the submodules you need; this package file stays import-free (deepspeed is slow to import).
"""

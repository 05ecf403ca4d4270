"""The library under the programs (train_gpt2.py, fineweb.py, ...): one module per job, imported as pretrain.X.

    config        typed dataclasses, each key declared once (model.option), TOML + --section.key=value
    errors        UserError, the base of what a user can fix; errors.run prints one line and exits 2
    runtime       device, dtype, autocast, torch.compile, seeding: the choices every program makes
    distributed   process group setup and the collectives the training loop needs
    parallel      DDP or FSDP2, activation checkpointing, whole-model state dicts under either
    trainer       the training step, evaluation, loaders, the periodic jobs (train_gpt2.py and the benchmarks)
    optim         the optimizer built from the config, and the learning-rate schedule
    run_dir       the run folder: file names, where a run starts (train.resume), truncated records, the lock
    checkpoint    what a checkpoint holds; atomic save, safe load, newest, load_model for every program
    preemption    SIGTERM/SIGUSR1/SIGINT: every rank stops after the same step, rank 0 saves
    tokenizer     the GPT-2 BPE, offline (ranks shipped in assets/)
    shards        the token shard format: write, read (memory-mapped), list
    loader        ShardLoader: shuffled, rank-disjoint, exactly resumable training batches
    sources       where documents come from: local files, a Hugging Face dataset, the offline demo corpus
    shard_builder documents -> token shards, resumable (fineweb.py's engine)
    tokenize_pool the shard builder's tokenizer processes, whose shutdown cannot deadlock
    hf_export     a model as a Hugging Face GPT-2 folder (export_hf.py's engine)
    sampling      prompts -> text through GPT.generate, streamed if asked
    hellaswag     HellaSwag rows (Hub or jsonl), checked and rendered in both published styles
    hellaswag_scoring  the fast HellaSwag scorer (context once, head where scored), split over ranks
    core_bundle   the CORE eval bundle: read and checked, downloaded once (atomically, under a lock)
    core_prompts  CORE items as scored token sequences, by nanochat's rules
    core_scoring  the packed CORE scorer (shared prefix once, head only where scored)
    core_eval     the CORE metric: load_core, evaluate_core
    bpb           bits per byte of the validation tokens
    metrics       FLOPs per token, MFU and the metrics log (fanned out to trackers and the summary)
    progress      the progress bar on a terminal, plain lines in a log
    summary       the end-of-run summary (printed, and summary.json)
    trackers      Weights & Biases and TensorBoard logging, optional
    plots         plot.py's figure of training curves, and the figure helper (matplotlib, optional)
    health        update-to-data ratios, gradients, activations, attention entropy -> health.jsonl
    health_plots  plot.py --health's figure
    fileio        atomic file writes; JSON-lines records written and read

Arrows point one way: programs -> pretrain -> model.py; model.py imports nothing of ours.
"""

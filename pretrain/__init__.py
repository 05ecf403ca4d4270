"""The library under the programs (train_gpt2.py, fineweb.py, ...): one module per job, imported as pretrain.X.

    config        typed dataclasses, TOML + --section.key=value, validation with helpful errors
    runtime       device, dtype, autocast, torch.compile, seeding: the choices every program makes
    distributed   process group setup and the collectives the training loop needs
    tokenizer     the GPT-2 BPE, offline (ranks shipped in assets/)
    shards        the token shard format: write, read (memory-mapped), list
    loader        ShardLoader: shuffled, rank-disjoint, exactly resumable training batches
    sources       where documents come from: local files, a Hugging Face dataset, the offline demo corpus
    shard_builder documents -> token shards in a process pool, resumable (fineweb.py's engine)
    checkpoint    what a checkpoint holds; atomic save, safe load, newest, load_model for every program
    sampling      prompts -> text through GPT.generate
    hellaswag     HellaSwag rows (Hub or jsonl), checked and rendered in both published styles
    hellaswag_scoring  the fast HellaSwag scorer (context once, head where scored), split over ranks
    metrics       FLOPs per token, MFU and the metrics log
    schedule      the learning-rate schedule
    fileio        atomic file writes

Arrows point one way: programs -> pretrain -> model.py; model.py imports nothing of ours.
"""

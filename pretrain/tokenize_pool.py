"""Tokenizing documents in a process pool, in input order: the parallel half of the shard builder.

concurrent.futures rather than multiprocessing.Pool: Pool.terminate() can deadlock when a build is interrupted (its
task-handler thread blocks on the queue's lock while the main thread joins it). Here, on any exit, queued tasks are
cancelled and shutdown waits only for the few tasks already running (a fraction of a second each).
"""

import array
import contextlib
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Iterator

import numpy as np

from pretrain.tokenizer import EOT_ID, get_encoding


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing in a process pool


def tokenize_documents(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """<|endoftext|> + tokens for each document, concatenated as uint16, and each document's token count."""
    # One thread: the parallelism comes from the process pool; threads on top would oversubscribe the cores.
    ids = get_encoding().encode_ordinary_batch(docs, num_threads=1)
    lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
    flat = array.array("H")  # uint16, filled from the lists faster than np.array(list) converts them
    for doc in ids:
        flat.append(EOT_ID)
        flat.fromlist(doc)
    return np.frombuffer(flat, dtype=np.uint16), lengths


def chunks(docs: Iterator[str], chunk_chars: int) -> Iterator[list[str]]:
    """Group documents into lists of about chunk_chars characters (a huge document is a chunk of its own)."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenized(chunks: Iterator[list[str]], pool: ProcessPoolExecutor | None,
               window: int) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """(docs, tokens, lengths) for each chunk, in input order; pool None tokenizes in this process."""
    if pool is None:
        for docs in chunks:
            yield docs, *tokenize_documents(docs)
        return
    # At most `window` tasks in flight: mapping over the whole source would read an endless stream ahead.
    pending: deque[tuple[list[str], Future]] = deque()
    try:
        for docs in chunks:
            pending.append((docs, pool.submit(tokenize_documents, docs)))
            if len(pending) >= window:
                docs, future = pending.popleft()
                yield docs, *future.result()
        while pending:
            docs, future = pending.popleft()
            yield docs, *future.result()
    finally:
        for _, future in pending:  # on an error or an interrupt: nothing queued is started any more
            future.cancel()


@contextlib.contextmanager
def maybe_pool(workers: int):
    """A process pool of `workers` tokenizers (None for one: tokenize in this process); on any exit, queued tasks
    are cancelled (see the module's docstring)."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(os.getpid(),))
    try:
        pool.submit(int).result()  # starts the workers now, before the source or tqdm start threads
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(parent_pid: int) -> None:
    # Ctrl-C reaches every process in the group: let the main process alone handle it (it ends the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    """A worker whose main process was killed (SIGKILL, OOM) exits too, rather than wait forever on a result pipe
    while holding inherited file descriptors, the output directory's lock among them."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)

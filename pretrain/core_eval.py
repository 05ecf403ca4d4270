"""The DCLM CORE metric (Li et al. 2024, "DataComp-LM"), computed as nanochat computes it: load the bundle's tasks
once (load_core), then evaluate a model on them (evaluate_core) as often as wanted.

An item is right when (multiple_choice, schema) its gold candidate has the lowest mean loss over its scored tokens,
the first such candidate on a tie; (language_modeling) greedy decoding predicts every continuation token. A task's
accuracy is centered on its random baseline, (acc - baseline) / (1 - baseline), and CORE is the mean of the
centered accuracies. Rules for prompts: core_prompts.py; the fast scorer: core_scoring.py; the bundle:
core_bundle.py. Under torch.distributed each rank scores every world_size-th item of each task and the counts are
summed, so every rank gets the result of one process.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import distributed, parallel
from pretrain.config import TrainConfig
from pretrain.core_bundle import EVAL_BUNDLE_URL, CoreTask, CoreUnavailable, find_bundle, read_tasks
from pretrain.core_prompts import build_prompts
from pretrain.core_scoring import Row, pack, score
from pretrain.runtime import Runtime


@dataclass(frozen=True)
class Item:
    task: int  # index into CoreData.tasks
    gold: int
    first: int  # its candidates are first .. first + count - 1 of the share
    count: int


@dataclass(frozen=True)
class Share:
    """One rank's items, tokenized and packed into rows for one block_size."""

    items: list[Item]
    rows: list[Row]
    n_candidates: int


@dataclass
class CoreData:
    bundle: Path
    max_per_task: int  # <= 0: every row
    tasks: list[CoreTask]
    _shares: dict = field(default_factory=dict, repr=False)  # (rank, world_size, block_size) -> Share

    def share(self, rank: int, world_size: int, block_size: int) -> Share:
        """Items rank, rank + world_size, ... of each task, tokenized on first use and then kept."""
        key = (rank, world_size, block_size)
        if key not in self._shares:
            items, rows = [], []
            n_candidates = 0
            for t, task in enumerate(self.tasks):
                for prompt in build_prompts(task, range(rank, len(task.rows), world_size), block_size):
                    rows += pack(prompt, n_candidates, block_size)
                    items.append(Item(t, prompt.gold, n_candidates, len(prompt.sequences)))
                    n_candidates += len(prompt.sequences)
            self._shares[key] = Share(items, rows, n_candidates)
        return self._shares[key]


def load_core(bundle_dir: str | Path | None = None, max_per_task: int = 0, url: str = EVAL_BUNDLE_URL) -> CoreData:
    """The tasks of a bundle folder, or of the cached bundle (downloaded from url on first use): every row of each
    task, or the first max_per_task after nanochat's shuffle."""
    bundle = find_bundle(bundle_dir, url)
    return CoreData(bundle, max_per_task, read_tasks(bundle, max_per_task))


def load_for_training(train: TrainConfig, is_master: bool) -> CoreData | None:
    """The CORE tasks training evaluates every train.core_interval steps, loaded once at startup. None when off, or
    when the bundle is not here and cannot be downloaded (said once): training goes on without it. All ranks agree.
    A bundle that is there but broken stops the run (CoreError)."""
    if train.core_interval == 0:
        return None
    try:
        data, reason = load_core(train.core_bundle or None, train.core_max_per_task), ""
    except CoreUnavailable as e:
        data, reason = None, str(e).replace("with --bundle DIR", "with train.core_bundle=DIR")
    if not distributed.all_ranks_agree(data is not None):
        if is_master:
            print(f"core: off for this run: {reason or 'another rank could not load the bundle'}")
        return None
    return data


@dataclass(frozen=True)
class TaskScore:
    label: str
    task_type: str
    num_fewshot: int
    baseline: float  # the accuracy of guessing, as a fraction
    count: int  # items scored, over all ranks
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.count

    @property
    def centered(self) -> float:
        return (self.accuracy - self.baseline) / (1 - self.baseline)


@dataclass(frozen=True)
class CoreResult:
    tasks: tuple[TaskScore, ...]

    @property
    def core(self) -> float:
        """The mean of the tasks' centered accuracies."""
        return sum(task.centered for task in self.tasks) / len(self.tasks)

    def metrics(self) -> dict:
        """The record training logs to metrics.jsonl: core, and per task core_<label> (centered) and
        core_<label>_acc."""
        record = {"core": self.core}
        for task in self.tasks:
            record[f"core_{task.label}"] = task.centered
            record[f"core_{task.label}_acc"] = task.accuracy
        return record

    def table(self) -> str:
        width = max(len("CORE"), *(len(task.label) for task in self.tasks))
        lines = [f"{'task':<{width}}  {'type':<17}  shots  {'items':>6}  accuracy  centered"]
        for task in self.tasks:
            lines.append(f"{task.label:<{width}}  {task.task_type:<17}  {task.num_fewshot:>5}  {task.count:>6}  "
                         f"{task.accuracy:>8.4f}  {task.centered:>8.4f}")
        lines.append(f"{'CORE':<{width}}  {'':<17}  {'':>5}  {'':>6}  {'':>8}  {self.core:>8.4f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"core {self.core:.4f} ({len(self.tasks)} tasks, {sum(task.count for task in self.tasks)} items)"


def is_correct(task_type: str, mean_losses: list[float], all_predicted: list[bool], gold: int) -> bool:
    """nanochat's decision, with its Python semantics: the first lowest mean loss (a candidate with no scored tokens
    has a nan mean, which `min` passes over unless it comes first), or every greedy prediction right."""
    if task_type == "language_modeling":
        return all_predicted[0]
    return mean_losses.index(min(mean_losses)) == gold


def evaluate_core(model: torch.nn.Module, data: CoreData, rt: Runtime, batch_size: int = 16,
                  progress: bool = False) -> CoreResult:
    """Accuracy on every task of data and the CORE metric. Under torch.distributed every rank must call it.
    model may be wrapped in DDP or torch.compile; its train/eval mode is restored afterwards."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = data.share(rank, world_size, parallel.unwrap(model).config.block_size)
    mean_losses, all_predicted = score(model, share.rows, share.n_candidates, rt, batch_size,
                                       progress=progress and rank == 0)
    counts = torch.zeros(len(data.tasks), 2, dtype=torch.long)
    for item in share.items:
        task_type = data.tasks[item.task].task_type
        candidates = slice(item.first, item.first + item.count)
        right = is_correct(task_type, mean_losses[candidates], all_predicted[candidates], item.gold)
        counts[item.task] += torch.tensor([1, int(right)])
    counts = distributed.all_reduce_sum(counts.to(rt.device)).tolist()
    return CoreResult(tuple(TaskScore(task.label, task.task_type, task.num_fewshot, task.baseline, count, correct)
                            for task, (count, correct) in zip(data.tasks, counts)))

"""The DCLM CORE eval bundle on disk: find or download it, read its tasks and rows, check them; write one.

A bundle (nanochat's eval_bundle.zip, unzipped) is a folder holding
    core.yaml            icl_tasks: a list of {label, dataset_uri, num_fewshot: [N, ...], icl_task_type,
                         continuation_delimiter (default " ")}; the first num_fewshot entry is used
    eval_meta_data.csv   one row per task: "Eval Task" (the label) and "Random baseline" (in percent)
    eval_data/<uri>      one JSON object per line: multiple_choice {query, choices, gold},
                         schema {context_options, continuation, gold}, language_modeling {context, continuation}
Each task's rows are shuffled with random.Random(1337) and the first max_per_task kept, as nanochat does, so a
subset is the same subset everywhere. Anything unusable is a CoreError naming the file and the row.
"""

import csv
import fcntl
import json
import os
import random
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

from pretrain.errors import UserError
from pretrain.fileio import located_rows

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's
CACHE_ENV = "PRETRAIN_CACHE"  # overrides ~/.cache/pretrain, where the bundle is downloaded to
BUNDLE_FILES = ("core.yaml", "eval_meta_data.csv", "eval_data")
SHUFFLE_SEED = 1337
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# The fields each task type's rows need: text fields, list-of-text fields, and whether `gold` indexes the list.
ROW_FIELDS = {
    "multiple_choice": (("query",), "choices"),
    "schema": (("continuation",), "context_options"),
    "language_modeling": (("context", "continuation"), None),
}


class CoreError(UserError):
    """A CORE bundle, task or row that cannot be used; the message names the file (and row) and what is wrong."""


class CoreUnavailable(CoreError):
    """The bundle is not here and cannot be downloaded (no network)."""


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str  # one of TASK_TYPES
    num_fewshot: int
    delimiter: str  # between a prompt and its continuation
    baseline: float  # the accuracy of guessing, as a fraction
    rows: list[dict]  # checked, shuffled with SHUFFLE_SEED, the first max_per_task
    origins: list[str]  # where each row came from ("FILE line N"), for error messages


# ---- Reading -------------------------------------------------------------------------------------------------


def read_tasks(bundle: str | Path, max_per_task: int = 0) -> list[CoreTask]:
    """Every task of core.yaml, in its order, with its rows (all of them when max_per_task <= 0)."""
    bundle = Path(bundle)
    for name in BUNDLE_FILES:
        if not (bundle / name).exists():
            raise CoreError(f"CORE bundle {bundle} has no {name} (a bundle holds {', '.join(BUNDLE_FILES)})")
    baselines = read_baselines(bundle / "eval_meta_data.csv")
    tasks = []
    for entry in read_task_list(bundle / "core.yaml"):
        label = entry["label"]
        if label not in baselines:
            raise CoreError(f"{bundle / 'eval_meta_data.csv'}: no row for task {label!r} (column 'Eval Task'), "
                            "so its random baseline is unknown")
        baseline, where = baselines[label]
        try:
            baseline = float(baseline) / 100
        except ValueError:
            raise CoreError(f"{where}: Random baseline {baseline!r} of task {label!r} is not a number") from None
        if not 0 <= baseline < 1:
            raise CoreError(f"{where}: Random baseline of task {label!r} must be in [0, 100), got {baseline * 100}")
        named = read_rows(bundle / "eval_data" / entry["dataset_uri"], entry["icl_task_type"])
        random.Random(SHUFFLE_SEED).shuffle(named)
        if max_per_task > 0:
            named = named[:max_per_task]
        if entry["num_fewshot"] >= len(named):
            raise CoreError(f"{bundle / 'core.yaml'}: task {label!r} asks for {entry['num_fewshot']} few-shot "
                            f"examples but has {len(named)} rows (each item's examples are other rows)")
        tasks.append(CoreTask(label, entry["icl_task_type"], entry["num_fewshot"], entry["continuation_delimiter"],
                              baseline, [row for _, row in named], [where for where, _ in named]))
    return tasks


def read_task_list(path: Path) -> list[dict]:
    """core.yaml's icl_tasks, checked, with num_fewshot as one int and the delimiter filled in."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CoreError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise CoreError(f"{path}: expected a non-empty list under 'icl_tasks'")
    tasks, labels = [], set()
    for n, entry in enumerate(entries):
        where = f"{path}: icl_tasks entry {n}"
        if not isinstance(entry, dict):
            raise CoreError(f"{where}: expected a mapping, got {type(entry).__name__}")
        for key in ("label", "dataset_uri", "icl_task_type"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise CoreError(f"{where}: {key} must be a non-empty string, got {entry.get(key)!r}")
        where = f"{path}: task {entry['label']!r}"
        if entry["label"] in labels:
            raise CoreError(f"{where} appears twice")
        labels.add(entry["label"])
        if entry["icl_task_type"] not in TASK_TYPES:
            raise CoreError(f"{where}: icl_task_type {entry['icl_task_type']!r} is not one of {', '.join(TASK_TYPES)}")
        shots = entry.get("num_fewshot")
        if not isinstance(shots, list) or not shots or not _is_int(shots[0]) or shots[0] < 0:
            raise CoreError(f"{where}: num_fewshot must be a list whose first entry is a count >= 0, got {shots!r}")
        delimiter = entry.get("continuation_delimiter", " ")
        if not isinstance(delimiter, str):
            raise CoreError(f"{where}: continuation_delimiter must be a string, got {delimiter!r}")
        tasks.append({**entry, "num_fewshot": shots[0], "continuation_delimiter": delimiter})
    return tasks


def read_baselines(path: Path) -> dict[str, tuple[str, str]]:
    """Each task's "Random baseline" (still text: only the tasks in use must be numbers) and where it is."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [name for name in ("Eval Task", "Random baseline") if name not in (reader.fieldnames or [])]
        if missing:
            raise CoreError(f"{path}: no column {' or '.join(map(repr, missing))} in its header line")
        return {row["Eval Task"]: (row["Random baseline"] or "", f"{path} line {reader.line_num}") for row in reader}


def read_rows(path: Path, task_type: str) -> list[tuple[str, dict]]:
    """The checked rows of a task's jsonl file, each with where it came from."""
    return [(where, check_row(row, task_type, where)) for where, row in located_rows(path, CoreError,
                                                                                      "task data file")]


def check_row(row, task_type: str, where: str) -> dict:
    """The fields the task type renders, as text (numbers become text, as a template would print them)."""
    if not isinstance(row, dict):
        raise CoreError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text_fields, list_field = ROW_FIELDS[task_type]
    needed = [*text_fields, *([list_field, "gold"] if list_field else [])]
    missing = [name for name in needed if name not in row]
    if missing:
        raise CoreError(f"{where}: missing field(s) {', '.join(missing)} (a {task_type} row has {', '.join(needed)})")
    checked = {name: _text(row[name], f"{where}: {name}") for name in text_fields}
    if list_field:
        options = row[list_field]
        if not isinstance(options, list) or not options:
            raise CoreError(f"{where}: {list_field} must be a non-empty list, got {options!r}")
        checked[list_field] = [_text(option, f"{where}: {list_field}[{i}]") for i, option in enumerate(options)]
        gold = row["gold"]
        if not _is_int(gold) or not 0 <= gold < len(options):
            raise CoreError(f"{where}: gold {gold!r} is not an index into its {len(options)} {list_field}")
        checked["gold"] = gold
    return checked


def _text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise CoreError(f"{where} must be text, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- Finding and downloading ---------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pretrain")


def find_bundle(bundle: str | Path | None = None, url: str = EVAL_BUNDLE_URL) -> Path:
    """The bundle folder: `bundle` when given, else the cached copy, downloaded from url on first use."""
    if bundle:
        bundle = Path(bundle)
        if not (bundle / "core.yaml").is_file():
            raise CoreError(f"CORE bundle {bundle} has no core.yaml: pass the unzipped eval_bundle folder")
        return bundle
    return download_bundle(url, cache_dir())


def download_bundle(url: str, cache: Path) -> Path:
    """cache/eval_bundle, downloaded and unzipped once. Ranks and concurrent runs take a file lock, so one
    downloads while the others wait; the folder appears complete (by a rename) or not at all."""
    target = cache / "eval_bundle"
    if (target / "core.yaml").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "eval_bundle.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "core.yaml").is_file():  # another process finished while this one waited
            return target
        if target.exists():
            raise CoreError(f"{target} exists but holds no core.yaml: remove it to download the bundle again")
        with tempfile.TemporaryDirectory(dir=cache, prefix=".eval_bundle.") as tmp:
            archive = Path(tmp) / "eval_bundle.zip"
            fetch(url, archive)
            unzipped = unzip_bundle(archive, Path(tmp) / "unzipped")
            unzipped.rename(target)
    return target


def fetch(url: str, path: Path) -> None:
    print(f"downloading the CORE eval bundle from {url}", flush=True)
    try:
        with requests.get(url, stream=True, timeout=(10, 60)) as response:
            response.raise_for_status()
            with open(path, "wb") as f:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
    except requests.RequestException as e:
        reason = f"HTTP {e.response.status_code}" if e.response is not None else type(e).__name__
        raise CoreUnavailable(f"could not download the CORE eval bundle from {url} ({reason}; no network?): "
                              "download eval_bundle.zip where there is network, unzip it and pass the folder "
                              "holding core.yaml with --bundle DIR") from None


def unzip_bundle(archive: Path, out: Path) -> Path:
    """The folder of the unzipped archive that holds core.yaml (nanochat's zip has one top folder, eval_bundle)."""
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(out)
    except zipfile.BadZipFile:
        raise CoreError(f"the downloaded CORE eval bundle ({archive.stat().st_size} bytes) is not a zip file") \
            from None
    found = sorted(p.parent for p in out.rglob("core.yaml"))
    if not found:
        raise CoreError("the downloaded CORE eval bundle holds no core.yaml")
    return found[0]


# ---- Writing (tests, benchmarks, custom bundles) ------------------------------------------------------------


def write_bundle(root: str | Path, tasks: list[dict]) -> Path:
    """A bundle in the layout above. Each task: label, icl_task_type, num_fewshot (an int), rows, baseline (in
    percent) and optionally continuation_delimiter."""
    root = Path(root)
    (root / "eval_data").mkdir(parents=True, exist_ok=True)
    entries = []
    for task in tasks:
        uri = f"{task['label']}.jsonl"
        entry = {"label": task["label"], "dataset_uri": uri, "num_fewshot": [task["num_fewshot"]],
                 "icl_task_type": task["icl_task_type"]}
        if "continuation_delimiter" in task:
            entry["continuation_delimiter"] = task["continuation_delimiter"]
        entries.append(entry)
        (root / "eval_data" / uri).write_text("".join(json.dumps(row) + "\n" for row in task["rows"]),
                                              encoding="utf-8")
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}, sort_keys=False), encoding="utf-8")
    with open(root / "eval_meta_data.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Eval Task", "Task Category", "Random baseline"])
        writer.writerows([task["label"], "synthetic", task["baseline"]] for task in tasks)
    return root


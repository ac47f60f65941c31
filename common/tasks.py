"""The three tasks of the paper: data loading, prompts, references and lengths (SPEC section 3).

Every split becomes a list of `Example(prompt, references)`. The data comes from the Hugging Face Hub
by default; when a local folder is given (`--data-dir` or the environment variable RLGF_DATA_DIR) laid
out like ../shared/data (`imdb/`, `common_gen/`, `openai_summarize_tldr/`, JSONL in the hub's schemas),
the very same preprocessing runs on those files instead.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UsageError

DATA_DIR_ENV = "RLGF_DATA_DIR"


@dataclass(slots=True)
class Example:
    prompt: str
    """the text the policy continues"""
    references: list[str]
    """human reference continuations (IMDB: the review's second half; CommonGen: every sentence written
    for the concept set; TL;DR: the human TL;DR)"""
    meta: dict = field(default_factory=dict)
    """task-specific extras: IMDB label, CommonGen concepts, TL;DR title"""


@dataclass(frozen=True)
class Task:
    name: str
    hub_id: str
    local_dir: str
    split_files: dict
    """our split name -> (hub split, local file); None where the split is derived (IMDB validation)"""
    min_new_tokens: int
    """the response's lengths (paper; the presets take them: common/presets.py)"""
    max_new_tokens: int
    truncation: str
    """how an over-long prompt is cut: 'left' keeps its end, 'tldr' cuts the post and keeps 'TL;DR:'"""

    def load(self, split: str, data_dir: str | None = None, limit: int | None = None) -> list[Example]:
        return load_split(self, split, data_dir, limit)


TASKS = {
    "imdb": Task(
        name="imdb",
        hub_id="stanfordnlp/imdb",
        local_dir="imdb",
        split_files={"train": ("train", "train.jsonl"), "validation": ("train", "train.jsonl"),
                     "test": ("test", "test.jsonl")},
        min_new_tokens=48, max_new_tokens=48, truncation="left",
    ),
    "commongen": Task(
        name="commongen",
        hub_id="allenai/common_gen",
        local_dir="common_gen",
        split_files={"train": ("train", "train.jsonl"), "validation": ("validation", "validation.jsonl"),
                     "test": ("test", "test.jsonl")},
        min_new_tokens=5, max_new_tokens=20, truncation="left",
    ),
    "tldr": Task(
        name="tldr",
        hub_id="CarperAI/openai_summarize_tldr",
        local_dir="openai_summarize_tldr",
        split_files={"train": ("train", "train.jsonl"), "validation": ("valid", "valid.jsonl"),
                     "test": ("test", "test.jsonl")},
        min_new_tokens=5, max_new_tokens=50, truncation="tldr",
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]


def resolve_data_dir(data_dir: str | None) -> str | None:
    """--data-dir wins over RLGF_DATA_DIR; None means the Hugging Face Hub."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UsageError(f"data folder {data_dir!r} does not exist: point --data-dir or {DATA_DIR_ENV} "
                         "at a folder laid out like ../shared/data")
    return data_dir


def hub_offline_if_unreachable(host: str = "huggingface.co") -> None:
    """Without a network, go straight to the local Hugging Face cache (HF_HUB_OFFLINE=1) instead of
    retrying for half a minute: a cached dataset or model still loads, anything else fails at once."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("_RLGF_HUB_CHECKED"):
        return
    os.environ["_RLGF_HUB_CHECKED"] = "1"
    import socket

    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        try:
            import huggingface_hub.constants as c

            c.HF_HUB_OFFLINE = True
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------------
# raw rows: hub or local JSONL, same schema
# ---------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path, need: tuple = (), check=None) -> Iterator[dict]:
    """The rows one at a time, so a split's raw rows are never all held at once: loading CommonGen's train and
    validation splits grew the process by 56-58 MiB with the rows in a list, by 38 MiB one at a time. A line that
    is not a JSON object (a list, a number, `null`), a row without one of the fields in `need`, or a row whose field
    has a bad value (`check(row)`: a message naming the field) is one error line naming the file and the line's
    number. Blank lines are skipped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                what = "not UTF-8" if isinstance(e, UnicodeDecodeError) else f"not valid JSON ({e.msg})"
                raise UsageError(f"{path}, line {number}: {what}; fix or remove that line") from None
            if not isinstance(row, dict):
                what = "null" if row is None else f"a JSON {type(row).__name__}"
                raise UsageError(f"{path}, line {number}: {what}, not an object (one row per line)")
            missing = [k for k in need if k not in row]
            if missing:
                raise UsageError(f"{path}, line {number}: the row has no field {missing[0]!r} (a row needs "
                                 f"{', '.join(need)})")
            problem = check(row) if check else None
            if problem:
                raise UsageError(f"{path}, line {number}: {problem}; fix or remove that line")
            yield row


ROW_FIELDS = {"imdb": ("text", "label"), "commongen": ("concept_set_idx", "concepts", "target"),
              "tldr": ("prompt", "label")}
"""the fields each task's rows must have (the hub's schemas)"""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _describe(v) -> str:
    """A bad value as the user wrote it (JSON spelling), cut short."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


_FIELD_RULES = {
    "imdb": {"text": (lambda v: isinstance(v, str), "a string (the review)"),
             "label": (lambda v: _is_int(v) and v in (0, 1), "0 (negative) or 1 (positive)")},
    "commongen": {"concept_set_idx": (_is_int, "an integer"),
                  "concepts": (lambda v: isinstance(v, list) and len(v) > 0
                               and all(isinstance(c, str) and c.strip() for c in v),
                               'a non-empty list of words (e.g. ["dog", "frisbee"])'),
                  "target": (lambda v: isinstance(v, str), "a string (the reference sentence)")},
    "tldr": {"prompt": (lambda v: isinstance(v, str), "a string (the post)"),
             "label": (lambda v: isinstance(v, str), "a string (the reference summary)")},
}
"""field -> (test, what it must be): the type and values each task's preprocessing needs"""


def row_problem(task_name: str, row: dict) -> str | None:
    """What is wrong with the values of a row that has the task's fields (wrong type, null, NaN or infinite, a
    label out of range), naming the field; None for a good row."""
    for name, (ok, what) in _FIELD_RULES[task_name].items():
        v = row[name]
        if not ok(v):
            return f"field {name!r} is {_describe(v)}: it must be {what}"
    return None


def _checked(rows: Iterable[dict], task: Task, source: str) -> Iterator[dict]:
    """The rows, each checked for the task's fields and their values: a missing or bad one is one error line
    naming the source, the row and the field."""
    need = ROW_FIELDS[task.name]
    for number, row in enumerate(rows, 1):
        missing = [k for k in need if k not in row]
        if missing:
            raise UsageError(f"{source}: row {number} has no field {missing[0]!r} (a {task.name} row needs "
                             f"{', '.join(need)})")
        problem = row_problem(task.name, row)
        if problem:
            raise UsageError(f"{source}: row {number}: {problem}")
        yield row


def local_files(task: Task, data_dir: str, splits=("train", "validation")) -> list[Path]:
    """The local JSONL files the given splits are read from (IMDB's train and validation share one)."""
    return sorted({Path(data_dir) / task.local_dir / task.split_files[s][1] for s in splits})


def _raw_rows(task: Task, split: str, data_dir: str | None) -> Iterable[dict]:
    hub_split, filename = task.split_files[split]
    if data_dir is not None:
        path = Path(data_dir) / task.local_dir / filename
        if not path.is_file():
            raise UsageError(f"missing data file {path}: the data folder must hold "
                             f"{task.local_dir}/{filename} (laid out like ../shared/data)")
        return _read_jsonl(path, ROW_FIELDS[task.name], lambda row: row_problem(task.name, row))
    hub_offline_if_unreachable()
    try:
        import datasets

        ds = datasets.load_dataset(task.hub_id, split=hub_split)
    except Exception as e:  # no network, no cache: one line that says how to fix it
        raise UsageError(f"cannot load {task.hub_id!r} from the Hugging Face Hub ({type(e).__name__}); "
                         f"offline, set {DATA_DIR_ENV} or --data-dir to a folder laid out like "
                         "../shared/data") from None
    return _checked((dict(r) for r in ds), task, f"{task.hub_id} ({hub_split})")


# ---------------------------------------------------------------------------------------------------
# per-task preprocessing (SPEC section 3)
# ---------------------------------------------------------------------------------------------------
def _imdb(rows: Iterable[dict], split: str) -> list[Example]:
    rows = list(rows)
    if split in ("train", "validation"):
        # the hub has no validation split: 80/20 split of train with seed 42
        order = list(range(len(rows)))
        random.Random(42).shuffle(order)
        n_train = int(0.8 * len(rows))
        order = order[:n_train] if split == "train" else order[n_train:]
        rows = [rows[i] for i in order]
    out = []
    for r in rows:
        words = r["text"].split()
        half = len(words) // 2
        # prompt: the first 50% of the review's whitespace words (both labels)
        out.append(Example(prompt=" ".join(words[:half]), references=[" " + " ".join(words[half:])],
                           meta={"label": int(r["label"])}))
    return out


def commongen_prompt(concepts: list[str]) -> str:
    return "generate a sentence with: " + " ".join(concepts) + "."


def _commongen(rows: Iterable[dict], split: str) -> list[Example]:
    groups: OrderedDict = OrderedDict()  # one example per concept set, every reference kept
    for r in rows:
        key = (r["concept_set_idx"], tuple(sys.intern(c) for c in r["concepts"]))  # one copy of each concept word
        groups.setdefault(key, []).append(r["target"].strip())
    out = []
    for (_, concepts), targets in groups.items():
        refs = [" " + t for t in targets if t]
        out.append(Example(prompt=commongen_prompt(list(concepts)), references=refs,
                           meta={"concepts": list(concepts)}))
    return out


def _tldr(rows: Iterable[dict], split: str) -> list[Example]:
    out = []
    for r in rows:
        # the hub's prompts end in "TL;DR: " (one space) and labels carry no leading space: join robustly
        prompt = r["prompt"].rstrip()
        title = ""
        for line in prompt.split("\n"):
            if line.startswith("TITLE:"):
                title = line[len("TITLE:"):].strip()
        out.append(Example(prompt=prompt, references=[" " + r["label"].strip()], meta={"title": title}))
    return out


_PREPROCESS = {"imdb": _imdb, "commongen": _commongen, "tldr": _tldr}


def load_split(task: Task, split: str, data_dir: str | None = None, limit: int | None = None) -> list[Example]:
    if split not in task.split_files:
        raise UsageError(f"unknown split {split!r} for task {task.name}: choose train, validation or test")
    data_dir = resolve_data_dir(data_dir)
    examples = _PREPROCESS[task.name](_raw_rows(task, split, data_dir), split)
    if not examples:
        source = (Path(data_dir) / task.local_dir / task.split_files[split][1] if data_dir is not None
                  else f"{task.hub_id} ({task.split_files[split][0]})")
        raise UsageError(f"the {split} split of {task.name} is empty: {source} holds no rows"
                         + (" for it (IMDB's validation split is the last 20% of train.jsonl's rows)"
                            if task.name == "imdb" and split == "validation" else ""))
    return examples[:limit] if limit else examples


# ---------------------------------------------------------------------------------------------------
# prompt tokenisation with the task's truncation rule
# ---------------------------------------------------------------------------------------------------
TLDR_MARK = "TL;DR:"


def encode_prompt(task: Task, tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """Token ids of one prompt, its text at most `max_tokens` long, cut the way the task asks; with the
    tokenizer's chat template on (common.chat), the template goes around the cut text and is never cut."""
    from common.chat import wrap

    return wrap(tokenizer, _cut_prompt(task, tokenizer, prompt, max_tokens))


def _cut_prompt(task: Task, tokenizer, prompt: str, max_tokens: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return ids
    if task.truncation == "tldr" and TLDR_MARK in prompt:
        # cut the post, never the closing "TL;DR:" (SPEC section 3): head keeps subreddit, title, post start
        cut = prompt.rfind("\n" + TLDR_MARK)
        cut = cut if cut >= 0 else prompt.rfind(TLDR_MARK)
        tail = tokenizer(prompt[cut:], add_special_tokens=False)["input_ids"]
        head = tokenizer(prompt[:cut], add_special_tokens=False)["input_ids"]
        return head[: max(0, max_tokens - len(tail))] + tail[-max_tokens:]
    return ids[-max_tokens:]  # keep the end of the prompt, which the continuation must follow

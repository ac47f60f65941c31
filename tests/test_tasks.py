"""Task preprocessing (common/tasks.py, SPEC section 3) on rows of the local data folder."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest

from common.errors import UsageError
from common.models import load_tokenizer
from common.tasks import TLDR_MARK, commongen_prompt, encode_prompt, get_task, load_split
from conftest import DATA, needs_data


def _raw(rel: str) -> list[dict]:
    with open(DATA / rel, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _norm(text: str) -> str:
    return " ".join(text.split())


@needs_data
def test_imdb_prompt_is_first_half_of_words_and_split_is_80_20_disjoint():
    raw = _raw("imdb/train.jsonl")
    by_text = {_norm(r["text"]): r for r in raw}
    assert len(by_text) == len(raw)  # the local file has no duplicate texts (README)
    task = get_task("imdb")
    train, val = task.load("train", str(DATA)), task.load("validation", str(DATA))

    assert len(train) == int(0.8 * len(raw)) == 10000
    assert len(val) == len(raw) - len(train) == 2500

    seen: dict[str, str] = {}
    for split, examples in (("train", train), ("validation", val)):
        labels = set()
        for e in examples:
            full = _norm(e.prompt + e.references[0])
            assert full in by_text, "prompt + reference must give back the whole review"
            words, prompt_words = full.split(), e.prompt.split()
            assert len(prompt_words) == len(words) // 2  # first 50% of the whitespace words
            assert words[: len(prompt_words)] == prompt_words
            assert e.references[0].startswith(" ")  # the continuation joins the prompt with one space
            assert e.meta["label"] == by_text[full]["label"]
            assert full not in seen, f"review in both {seen.get(full)} and {split}"
            seen[full] = split
            labels.add(e.meta["label"])
        assert labels == {0, 1}, f"{split} must hold both labels"
    assert len(seen) == len(raw)  # train + validation cover the whole train file, disjointly

    # the split is seeded: loading again gives the same order
    assert [e.prompt for e in task.load("validation", str(DATA))] == [e.prompt for e in val]
    # test split: every row, same preprocessing
    test = task.load("test", str(DATA))
    assert len(test) == len(_raw("imdb/test.jsonl"))
    assert all(len(e.prompt.split()) == len(_norm(e.prompt + e.references[0]).split()) // 2 for e in test[:200])


@needs_data
@pytest.mark.parametrize("split,file", [("validation", "validation.jsonl"), ("test", "test.jsonl")])
def test_commongen_groups_by_concept_set_with_all_references(split, file):
    raw = _raw(f"common_gen/{file}")
    groups: OrderedDict = OrderedDict()
    for r in raw:
        groups.setdefault(r["concept_set_idx"], (r["concepts"], []))[1].append(r["target"].strip())
    examples = get_task("commongen").load(split, str(DATA))

    assert len(examples) == len(groups)  # one example per concept set (993 validation, 1497 test)
    assert sum(len(e.references) for e in examples) == len(raw)  # every reference kept
    for e, (concepts, targets) in zip(examples, groups.values()):
        assert e.prompt == "generate a sentence with: " + " ".join(concepts) + "."
        assert e.prompt == commongen_prompt(concepts)
        assert [r.strip() for r in e.references] == targets
        assert all(r.startswith(" ") for r in e.references)
        assert e.meta["concepts"] == concepts
    assert max(len(e.references) for e in examples) > 1


@needs_data
def test_tldr_prompt_ends_with_marker_and_truncation_keeps_it(tiny_model):
    raw = _raw("openai_summarize_tldr/train.jsonl")
    task = get_task("tldr")
    train = task.load("train", str(DATA))
    assert len(train) == len(raw)
    for e, r in zip(train, raw):
        assert e.prompt.endswith(TLDR_MARK)
        assert e.prompt.startswith("SUBREDDIT:")
        assert e.references == [" " + r["label"].strip()]
    assert [task.load("validation", str(DATA))[i].prompt for i in range(3)] == \
        [r["prompt"].rstrip() for r in _raw("openai_summarize_tldr/valid.jsonl")[:3]]

    tok = load_tokenizer(str(tiny_model("tldr")))
    long_posts = [e.prompt for e in train[:150] if len(tok(e.prompt, add_special_tokens=False)["input_ids"]) > 200][:20]
    assert long_posts
    for prompt in long_posts:
        ids = encode_prompt(task, tok, prompt, 64)
        text = tok.decode(ids)
        assert len(ids) == 64
        assert text.endswith(TLDR_MARK), text[-40:]
        assert text.startswith("SUBREDDIT:"), "the post is cut, not the subreddit / title head"
        assert tok.decode(ids[-4:]) in prompt[-40:]
    # a prompt that fits is left as it is
    short = "SUBREDDIT: r/test\nTITLE: hi\nPOST: short\nTL;DR:"
    assert encode_prompt(task, tok, short, 64) == tok(short, add_special_tokens=False)["input_ids"]


@needs_data
@pytest.mark.parametrize("name", ["imdb", "commongen"])
def test_left_truncation_keeps_the_end_of_the_prompt(tiny_model, name):
    task = get_task(name)
    tok = load_tokenizer(str(tiny_model(name)))
    for e in task.load("validation", str(DATA), limit=30):
        ids = encode_prompt(task, tok, e.prompt, 12)
        full = tok(e.prompt, add_special_tokens=False)["input_ids"]
        assert ids == full[-12:]


def test_unknown_task_and_split_and_missing_files(tmp_path):
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(UsageError, match="unknown split"):
        load_split(get_task("imdb"), "dev", str(tmp_path))
    with pytest.raises(UsageError, match="missing data file"):
        get_task("tldr").load("train", str(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        get_task("tldr").load("train", str(tmp_path / "absent"))

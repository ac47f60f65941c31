"""Rewards and metrics (common/rewards.py, common/metrics.py): offline, tiny models built on the fly."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from common import rewards as R
from common.errors import UsageError
from common.metrics import METRIC_KEYS, compute_metrics, concept_coverage, perplexity
from common.rewards import (CiderDReward, CommonGenReward, HFSentimentReward, RewardModelReward, RougeReward,
                            SpiceReward, VaderSentimentReward, sentiment_accuracy, spice_available)

DATA_DIR = Path(__file__).parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"local data folder {DATA_DIR} is absent")

WORDS = ("the a movie film was is great good awful bad boring plot actor acting story love hated it i "
         "and but not very really so this that dog cat ran sat on mat park threw ball . ,").split()


def _word_tokenizer(tmp_path: Path, **special):
    """A tiny whitespace word-level tokenizer, trained offline, wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(list(special.values()) + ["[UNK]"] + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special), len(vocab)


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory):
    """A tiny DistilBERT sentiment classifier whose positive class is index 0 (found by its label name)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    path = tmp_path_factory.mktemp("distilbert")
    tokenizer, vocab_size = _word_tokenizer(path, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                              max_position_embeddings=24, num_labels=2, pad_token_id=tokenizer.pad_token_id,
                              id2label={0: "POSITIVE", 1: "NEGATIVE"}, label2id={"POSITIVE": 0, "NEGATIVE": 1})
    DistilBertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_rm_dir(tmp_path_factory):
    """A tiny GPT-2 reward model (num_labels 1) whose tokenizer has an EOS but no pad token."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    path = tmp_path_factory.mktemp("gpt2rm")
    tokenizer, vocab_size = _word_tokenizer(path, eos_token="<|endoftext|>")
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64, num_labels=1,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------
# sentiment
# ---------------------------------------------------------------------------------------------------
def test_vader_orders_clear_sentiment():
    reward = VaderSentimentReward()
    pos, neg = reward(["This movie was", "This movie was"],
                      [" wonderful, moving and great. I loved it!", " awful, boring and terrible. I hated it."],
                      [[], []])
    assert 0.5 < pos <= 1.0 and 0.0 <= neg < 0.5
    assert sentiment_accuracy(reward, ["I loved it, great film", "awful, I hated it"], [1, 0]) == 1.0


@needs_data
def test_vader_accuracy_on_local_imdb():
    from common.tasks import get_task

    examples = get_task("imdb").load("test", str(DATA_DIR))[:400]
    texts = [e.prompt + e.references[0] for e in examples]
    acc = sentiment_accuracy(VaderSentimentReward(), texts, [e.meta["label"] for e in examples])
    assert 0.6 < acc < 0.8  # 0.689 on the full 5000-review split


def test_hf_sentiment_positive_class_and_batch_independence(distilbert_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = HFSentimentReward(str(distilbert_dir), batch_size=2)
    assert reward.positive_index == 0  # "POSITIVE" is label 0 here, not the default index 1
    prompts = ["the movie was", "i really", "this film is", "the plot"]
    responses = [" great", " hated it and the acting was bad", " not good but the story is", " " + "so " * 40]
    batch = reward(prompts, responses, [[]] * 4)
    assert all(0.0 <= p <= 1.0 for p in batch)
    singles = [reward([p], [r], [[]])[0] for p, r in zip(prompts, responses)]
    assert batch == pytest.approx(singles, abs=1e-5)
    # by hand: softmax of the positive logit on prompt + response
    tok = AutoTokenizer.from_pretrained(distilbert_dir)
    model = AutoModelForSequenceClassification.from_pretrained(distilbert_dir).eval()
    with torch.no_grad():
        logits = model(**tok(prompts[0] + responses[0], return_tensors="pt", return_token_type_ids=False)).logits
    assert singles[0] == pytest.approx(torch.softmax(logits, -1)[0, 0].item(), abs=1e-5)
    # an explicit positive label overrides the name lookup
    flipped = HFSentimentReward(str(distilbert_dir), positive_label="NEGATIVE")
    assert flipped(prompts, responses, [[]] * 4) == pytest.approx([1 - p for p in batch], abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# CommonGen: CIDEr-D, SPICE
# ---------------------------------------------------------------------------------------------------
CG_REFS = [[" A dog runs across the park to catch a ball.", " The dog caught the ball in the park."],
           [" A man throws a frisbee to his dog.", " The man threw the frisbee for the dog."],
           [" A girl sits on a bench reading a book.", " The girl sat reading her book on the bench."],
           [" Two kids ride bikes down the street.", " The children rode their bicycles along the road."]]
CG_PROMPTS = ["generate a sentence with: dog park ball.", "generate a sentence with: man throw frisbee dog.",
              "generate a sentence with: girl sit bench book.", "generate a sentence with: kid ride bike street."]


def test_cider_identical_beats_unrelated_and_is_batch_independent():
    reward = CiderDReward(reference_corpus=CG_REFS)
    good = [refs[0] for refs in CG_REFS]
    scores = reward(CG_PROMPTS, good, CG_REFS)
    unrelated = reward(CG_PROMPTS, [" Stock markets fell sharply yesterday."] * 4, CG_REFS)
    assert all(s > u for s, u in zip(scores, unrelated))
    assert all(u == 0.0 for u in unrelated)
    # with a corpus, one sample's score does not depend on what else is in the batch
    assert reward(CG_PROMPTS[:1], good[:1], CG_REFS[:1]) == pytest.approx(scores[:1])
    mixed = reward([CG_PROMPTS[0], CG_PROMPTS[1]], [good[0], " a cat sat on a mat"], [CG_REFS[0], CG_REFS[1]])
    assert mixed[0] == pytest.approx(scores[0])
    # the corpus's document frequencies are not grown by scoring
    n = len(reward.document_frequency)
    reward(CG_PROMPTS, [" zebra quantum xylophone"] * 4, CG_REFS)
    assert len(reward.document_frequency) == n
    # without a corpus the batch's references are the corpus (library behaviour)
    assert CiderDReward()(CG_PROMPTS, good, CG_REFS) == pytest.approx(scores)


def _library_document_frequency(corpus):
    """pycocoevalcap's own count: a CiderScorer fed the corpus, then compute_doc_freq."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    for refs in corpus:
        scorer += (None, [R.coco_tokenize(r) for r in refs])
    scorer.compute_doc_freq()
    return dict(scorer.document_frequency)


@needs_data
def test_compact_document_frequencies_equal_the_librarys_and_give_the_same_cider():
    """The compact table holds the library's document frequency for every n-gram of the CommonGen training
    references, 0 for n-grams it never saw, and CIDEr-D through it equals CIDEr-D through the library's dict."""
    from common.tasks import get_task

    train = get_task("commongen").load("train", str(DATA_DIR))
    corpus = [e.references for e in train]
    lib = _library_document_frequency(corpus)
    df = R.DocumentFrequencies(corpus)
    assert len(df) == len(lib) > 1000 and df.n_documents == len(corpus)
    assert all(df[g] == c for g, c in lib.items())
    assert df[("qzxv", "wqpl")] == 0.0 and df[("qzxv",)] == 0.0
    ours = CiderDReward(reference_corpus=corpus)
    _, fixed = R._cider_scorer_class()

    class LibraryCounts(dict):
        def __missing__(self, key):
            return 0.0

    val = train[:40]
    responses = [e.references[0] for e in val[:20]] + [" a dog runs in the park with a ball"] * 20
    scorer = fixed(LibraryCounts(lib), len(corpus), n=4, sigma=6.0)
    for r, e in zip(responses, val):
        scorer += (R.coco_tokenize(r), [R.coco_tokenize(x) for x in e.references])
    want = scorer.compute_score()[1]
    got = ours([e.prompt for e in val], responses, [e.references for e in val])
    assert got == pytest.approx(list(want), abs=1e-9) and max(got) > 0.5


def test_cider_tokenisation_ignores_case_and_punctuation():
    reward = CiderDReward(reference_corpus=CG_REFS)
    a = reward(CG_PROMPTS[:1], ["a dog runs across the park to catch a ball"], CG_REFS[:1])
    b = reward(CG_PROMPTS[:1], ["A DOG runs across the park, to catch a ball!"], CG_REFS[:1])
    assert a == pytest.approx(b) and a[0] > 0


def test_cider_needs_references():
    with pytest.raises(UsageError):
        CiderDReward()(["p"], ["a dog"], [[]])
    with pytest.raises(UsageError):
        CiderDReward()(["p", "q"], ["a dog"], [["a dog"], ["a cat"]])


def test_spice_unavailable_warns_once(monkeypatch, capsys):
    if spice_available():
        pytest.skip("SPICE is installed here: the fallback path is not used")
    with pytest.raises(UsageError, match="SPICE"):
        SpiceReward()
    monkeypatch.setattr(R, "_SAID", set())
    reward = CommonGenReward(CG_REFS)
    CommonGenReward(CG_REFS)
    err = capsys.readouterr().err
    assert err.count("SPICE skipped:") == 1
    good = [refs[0] for refs in CG_REFS]
    assert reward(CG_PROMPTS, good, CG_REFS) == pytest.approx(CiderDReward(CG_REFS)(CG_PROMPTS, good, CG_REFS))


# ---------------------------------------------------------------------------------------------------
# ROUGE
# ---------------------------------------------------------------------------------------------------
def test_rouge_identical_is_one_and_uses_best_reference():
    reward = RougeReward("rougeL")
    assert reward(["p"], [" The cat sat on the mat."], [[" The cat sat on the mat."]]) == [pytest.approx(1.0)]
    assert reward(["p"], ["a dog ran"], [["stocks fell today", "a dog ran"]]) == [pytest.approx(1.0)]
    assert RougeReward("rouge2")(["p"], ["completely different words"], [["the cat sat"]]) == [0.0]
    with pytest.raises(UsageError):
        RougeReward("rouge9")


# ---------------------------------------------------------------------------------------------------
# learned reward model
# ---------------------------------------------------------------------------------------------------
def test_reward_model_scores_last_real_token(gpt2_rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = RewardModelReward(str(gpt2_rm_dir), batch_size=3)
    assert reward.tokenizer.pad_token_id is not None
    assert reward.tokenizer.pad_token_id != reward.tokenizer.eos_token_id
    assert reward.model.config.pad_token_id == reward.tokenizer.pad_token_id

    prompts = ["the movie was  ", "i", "this film is great and the story ", "the plot"]
    responses = [" great <|endoftext|>", " really love it and the acting was good", " so boring", " bad ."]
    scores = reward(prompts, responses)

    # by hand, from the saved weights and tokenizer: the score head on the last token, no padding at all
    tok = AutoTokenizer.from_pretrained(gpt2_rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(gpt2_rm_dir).eval()
    expected = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = tok(p.rstrip() + r, return_tensors="pt")["input_ids"]
            hidden = model.transformer(input_ids=ids).last_hidden_state
            expected.append(model.score(hidden[0, -1]).item())
    assert ids[0, -1].item() == tok.convert_tokens_to_ids(".")
    assert scores == pytest.approx(expected, abs=1e-5)
    # independent of batch composition (and hence of the amount of padding)
    assert [reward([p], [r])[0] for p, r in zip(prompts, responses)] == pytest.approx(expected, abs=1e-5)
    assert reward(prompts[::-1], responses[::-1]) == pytest.approx(expected[::-1], abs=1e-5)
    # the trailing EOS is a real token: scoring without it differs
    assert reward(prompts[:1], [" great"])[0] != pytest.approx(scores[0], abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# missing models
# ---------------------------------------------------------------------------------------------------
def test_missing_model_path_raises_usage_error(tmp_path, monkeypatch):
    for cls in (HFSentimentReward, RewardModelReward):
        with pytest.raises(UsageError, match="does not exist"):
            cls(str(tmp_path / "no_such_model"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(UsageError, match="local folder"):
        HFSentimentReward("someone-unknown/not-a-cached-model")


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------
def test_compute_metrics_keys_per_task():
    imdb = compute_metrics("imdb", ["This movie was"] * 2, [" great fun", " awful"], [[" a"], [" b"]])
    assert set(imdb) == {"sentiment"} and 0.0 <= imdb["sentiment"] <= 1.0

    tldr = compute_metrics("tldr", ["post TL;DR:"] * 2, [" my cat is sick", " I lost my job"],
                           [[" my cat is sick"], [" I need a new job"]])
    assert set(tldr) == {"rouge1", "rouge2", "rougeL"}
    assert tldr["rouge1"] < 1.0 and tldr["rougeL"] > 0.5

    good = [refs[0] for refs in CG_REFS]
    cg = compute_metrics("commongen", CG_PROMPTS, good, CG_REFS)
    assert set(cg) == {"rouge1", "rouge2", "rougeL", "bleu", "cider", "coverage"}
    assert set(cg) <= set(METRIC_KEYS["commongen"])
    assert cg["rouge1"] == pytest.approx(1.0) and cg["bleu"] == pytest.approx(100.0)
    assert cg["cider"] == pytest.approx(sum(CiderDReward()(CG_PROMPTS, good, CG_REFS)) / 4)
    bad = compute_metrics("commongen", CG_PROMPTS, [" stocks fell yesterday"] * 4, CG_REFS)
    assert bad["cider"] < cg["cider"] and bad["bleu"] < cg["bleu"] and bad["coverage"] == 0.0

    with pytest.raises(UsageError):
        compute_metrics("nope", ["p"], ["r"], [["r"]])
    with pytest.raises(UsageError):
        compute_metrics("tldr", ["p", "q"], ["r"], [["r"]])


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_meteor_with_slow_metrics():
    good = [refs[0] for refs in CG_REFS]
    cg = compute_metrics("commongen", CG_PROMPTS, good, CG_REFS, slow_metrics=True)
    assert cg["meteor"] == pytest.approx(1.0, abs=1e-6)
    bad = compute_metrics("commongen", CG_PROMPTS, [" stocks fell yesterday"] * 4, CG_REFS, slow_metrics=True)
    assert bad["meteor"] < 0.2


def test_coverage_hand_example():
    concepts = ["dog", "throw", "frisbee", "park"]
    assert concept_coverage(concepts, " The dogs threw a ball in the park.") == pytest.approx(0.75)
    assert concept_coverage(["dance", "stage"], "A dancer is dancing on stages") == pytest.approx(1.0)
    assert concept_coverage(["sit", "bench"], "The man sat on a chair.") == pytest.approx(0.5)
    # from meta, or parsed from the CommonGen prompt
    meta = [{"concepts": concepts}]
    by_meta = compute_metrics("commongen", ["p"], [" The dogs threw a ball in the park."], [["x"]], meta=meta)
    by_prompt = compute_metrics("commongen", ["generate a sentence with: dog throw frisbee park."],
                                [" The dogs threw a ball in the park."], [["x"]])
    assert by_meta["coverage"] == by_prompt["coverage"] == pytest.approx(0.75)


def test_perplexity_matches_hand_computation(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, vocab_size = _word_tokenizer(tmp_path, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      pad_token="[PAD]")
    torch.manual_seed(2)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                       bos_token_id=tok.bos_token_id))
    model.train()  # perplexity must switch dropout off itself, and restore the mode
    prompts = ["the movie was", "i really love this film and the story", "", "a"]
    texts = [" great", " but the acting was bad", " the dog ran", " cat sat on the mat ."]
    ppl = perplexity(model, tok, prompts, texts, device="cpu", batch_size=3)
    assert model.training

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for p, t in zip(prompts, texts):
            p_ids = tok(p, add_special_tokens=False)["input_ids"] or [tok.bos_token_id]  # empty prompt: BOS
            t_ids = tok(t, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([p_ids + t_ids])).logits[0], -1)
            for j, target in enumerate(t_ids):
                nll -= logp[len(p_ids) + j - 1, target].item()
                count += 1
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert perplexity(model, tok, prompts, texts, batch_size=1) == pytest.approx(ppl, rel=1e-5)


@needs_data
def test_commongen_metrics_and_reward_on_local_data():
    from common.tasks import get_task

    task = get_task("commongen")
    val = task.load("validation", str(DATA_DIR), limit=100)
    prompts, refs = [e.prompt for e in val], [e.references for e in val]
    multi = [i for i, r in enumerate(refs) if len(r) > 1]
    # leave-one-out: the first human reference against the others
    loo = compute_metrics("commongen", [prompts[i] for i in multi], [refs[i][0] for i in multi],
                          [refs[i][1:] for i in multi], meta=[val[i].meta for i in multi])
    assert 0.2 < loo["rougeL"] < 0.9 and 0.3 < loo["cider"] < 5 and loo["coverage"] > 0.9
    reward = CommonGenReward([e.references for e in val])
    own = reward(prompts[:10], [r[0] for r in refs[:10]], refs[:10])
    shuffled = reward(prompts[:10], [r[0] for r in refs[1:11]], refs[:10])
    assert sum(own) > sum(shuffled)

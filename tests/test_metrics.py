"""metrics/caption_metrics: parity with pycocoevalcap's scorers on real RISCM test captions, the no-Java fallback,
and the error texts for bad input. One Java compute is shared by the module (METEOR's JVM takes ~7 s to start)."""

from __future__ import annotations

import csv
import functools
import importlib.util
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import evaluate
import pytest
from conftest import RISCM_DIR

REPO = Path(__file__).resolve().parents[1]
METRIC_DIR = REPO / "metrics" / "caption_metrics"
RISCM_TEST = RISCM_DIR / "test.csv"
KEYS = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"]
PARITY_TOL = 1e-6
# On these captions the Python tokenizer gives exactly PTB's tokens (checked below), so the fallback's scores should
# match the Java ones to float round-off; 1e-6 leaves room for summation order only.
FALLBACK_TOL = 1e-6
NO_JAVA = "No `java` on PATH: coco-caption parity needs Java 8+ (e.g. `apt-get install default-jre-headless`)."
EDGE_PREDICTIONS = ["", "...", "A white plane (parked) on the runway, isn't it?", "TWO   SHIPS\nin the harbour ."]


def _riscm_images() -> list[list[str]]:
    captions: dict[str, list[str]] = {}
    with open(RISCM_TEST, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["image"], []).append(row["caption"])
    return list(captions.values())


def _perturb(caption: str, other: str, rng: random.Random, kind: int) -> str:
    words = caption.split()
    if kind == 0 or len(words) < 3:
        return caption
    i = rng.randrange(len(words) - 1)
    if kind == 1:  # drop a word
        return " ".join(words[:i] + words[i + 1 :])
    if kind == 2:  # swap two neighbours
        words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    if kind == 3:  # a word from another image's caption
        words[i] = rng.choice(other.split())
        return " ".join(words)
    return " ".join(words[: len(words) // 2 + 1]).upper()  # truncated, upper-case


def build_parity_data() -> tuple[list[str], list[list[str]]]:
    """150 predictions: a perturbed caption of each RISCM test image, scored against the image's other 3-4 captions;
    then 4 edge-case predictions with 1-2 references."""
    images = _riscm_images()
    several = [caps for caps in images if len(caps) >= 4][::20][:150]
    rng = random.Random(0)
    predictions, references = [], []
    for n, caps in enumerate(several):
        predictions.append(_perturb(caps[0], several[n - 1][1], rng, n % 5))
        references.append(caps[1:])
    few = [caps for caps in images if len(caps) in (2, 3)][: len(EDGE_PREDICTIONS)]
    predictions += EDGE_PREDICTIONS
    references += [caps[1:] for caps in few]
    return predictions, references


def reference_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """pycocoevalcap's scorers called directly, as COCOEvalCap.evaluate calls them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    meteor_score, _ = meteor.compute_score(gts, res)
    del meteor  # stops its JVM
    scores = {f"bleu_{n + 1}": b for n, b in enumerate(bleu)}
    scores.update(
        meteor=meteor_score, rouge_l=Rouge().compute_score(gts, res)[0], cider=Cider().compute_score(gts, res)[0]
    )
    return scores


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(METRIC_DIR))


@pytest.fixture(scope="module")
def parity(metric):
    """The module's scores and pycocoevalcap's on the same data, computed concurrently: each starts a METEOR JVM."""
    if shutil.which("java") is None:
        return None  # the tests using it fail with NO_JAVA (a failure, not an error or a skip)
    predictions, references = build_parity_data()
    with ThreadPoolExecutor(1) as pool:
        expected = pool.submit(reference_scores, predictions, references)
        ours = metric.compute(predictions=predictions, references=references)
        return predictions, references, ours, expected.result()


def test_parity_with_pycocoevalcap(parity):
    if parity is None:
        pytest.fail(NO_JAVA)
    predictions, references, ours, expected = parity
    assert len(predictions) >= 100 and sum(len(refs) >= 3 for refs in references) >= 100
    assert {len(refs) for refs in references} >= {1, 2, 3, 4}  # variable-length reference lists
    assert list(ours) == KEYS and all(isinstance(ours[k], float) for k in KEYS)
    diffs = {k: abs(ours[k] - expected[k]) for k in KEYS}
    print(
        f"{len(predictions)} predictions, {sum(map(len, references))} references; ours {ours}; max |diff| per key: {diffs}"
    )
    assert max(diffs.values()) <= PARITY_TOL, f"ours {ours}\npycocoevalcap {expected}\n|diff| {diffs}"
    assert 0.1 < ours["bleu_4"] < ours["bleu_1"] < 1 and 0.1 < ours["meteor"] < 1 and 0.5 < ours["cider"] < 10


def test_loads_by_relative_path_and_as_plain_function(monkeypatch):
    monkeypatch.chdir(REPO)
    assert type(evaluate.load("metrics/caption_metrics")).__name__ == "CaptionMetrics"
    monkeypatch.syspath_prepend(str(REPO))
    from metrics.caption_metrics import METRIC_KEYS, compute_caption_metrics  # the training script's import

    assert list(METRIC_KEYS) == KEYS and callable(compute_caption_metrics)


@functools.cache
def _load_plain_module():
    spec = importlib.util.spec_from_file_location("caption_metrics_plain", METRIC_DIR / "caption_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_tokenizer_matches_ptb_on_riscm_captions():
    if shutil.which("java") is None:
        pytest.fail(NO_JAVA + " This test compares with Java's PTBTokenizer.")
    module = _load_plain_module()
    captions = sorted({c for caps in _riscm_images() for c in caps}) + EDGE_PREDICTIONS
    java = module.ptb_tokenize({i: [c] for i, c in enumerate(captions)})
    mismatches = [(c, java[i][0], module.python_tokenize(c)) for i, c in enumerate(captions)]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert len(captions) > 10_000 and not mismatches, mismatches[:5]


def test_without_java_warns_and_leaves_meteor_out(parity, metric, monkeypatch, tmp_path):
    if parity is None:
        pytest.fail(NO_JAVA + " This test compares the fallback with the Java scores.")
    predictions, references, with_java, _ = parity
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `java`
    with pytest.warns(
        UserWarning, match=r"no `java` on PATH.*may differ slightly.*METEOR needs Java and is returned as None"
    ):
        without_java = metric.compute(predictions=predictions, references=references)
    assert list(without_java) == KEYS and without_java["meteor"] is None
    print("no-Java |diff| per key:", {k: abs(without_java[k] - with_java[k]) for k in KEYS if k != "meteor"})
    for key in KEYS:
        if key != "meteor":
            assert abs(without_java[key] - with_java[key]) <= FALLBACK_TOL, (key, without_java[key], with_java[key])


@pytest.mark.parametrize(
    ("predictions", "references", "error", "match"),
    [
        (["a", "b"], [["a"]], ValueError, r"Received 2 predictions but 1 reference lists; expected one list"),
        ([], [], ValueError, r"Received 0 predictions"),
        ("a plane", [["a plane"]], TypeError, r"predictions must be a list \(one entry per image\); received str"),
        ([3], [["a plane"]], TypeError, r"predictions\[0\] is int \(3\); expected a str caption"),
        (["a", "b"], [["a"], []], ValueError, r"references\[1\] is an empty list; each prediction needs at least one"),
        (
            ["a"],
            ["a plane"],
            TypeError,
            r"references\[0\] is str \('a plane'\); expected a list of reference captions",
        ),
        (["a"], [["a", None]], TypeError, r"references\[0\]\[1\] is NoneType \(None\); expected a str caption"),
    ],
)
def test_bad_input_errors(metric, predictions, references, error, match):
    with pytest.raises(error, match=match):
        metric.compute(predictions=predictions, references=references)
    with pytest.raises(error, match=match):
        _load_plain_module().compute_caption_metrics(predictions, references)

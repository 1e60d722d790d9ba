"""Caption metrics exactly as coco-caption computes them (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D), as an `evaluate`
module that loads offline by path, plus `compute_caption_metrics`, the same computation as a plain function."""

import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import datasets
import evaluate
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

METRIC_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
# How tables and model cards name each key
METRIC_NAMES = {
    "bleu_1": "BLEU-1",
    "bleu_2": "BLEU-2",
    "bleu_3": "BLEU-3",
    "bleu_4": "BLEU-4",
    "meteor": "METEOR",
    "rouge_l": "ROUGE-L",
    "cider": "CIDEr",
}

NO_JAVA_WARNING = (
    "caption_metrics: no `java` on PATH. BLEU, ROUGE-L and CIDEr use a pure-Python tokenizer that mimics coco-caption's "
    "PTB tokenisation, so scores may differ slightly from coco-caption's; METEOR needs Java and is returned as None. "
    "Install a Java runtime (8 or later, e.g. `apt-get install default-jre-headless`) for the reference scores."
)

_DESCRIPTION = """\
BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of generated captions against several reference captions per image, computed by
pycocoevalcap's own scorers (the coco-caption reference): Stanford PTB tokenisation with lower-casing and punctuation
removal, corpus BLEU with the closest reference length, METEOR 1.5, ROUGE-L (beta 1.2) averaged over images, and
CIDEr-D (sigma 6, clipped counts, IDF from the references given to `compute`). Needs Java; without it the module warns,
tokenises in Python (scores may differ slightly) and returns METEOR as None.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one generated caption per image.
    references (`list[list[str]]`): for each prediction, all reference captions of that image (one or more, the
        number may vary from image to image).
Returns:
    dict with exactly the keys `bleu_1`, `bleu_2`, `bleu_3`, `bleu_4`, `meteor`, `rouge_l`, `cider`: floats
    (`meteor` is None when Java is missing). CIDEr's IDF comes from the references passed in, so score the whole
    evaluation set in one call (gather across processes first).
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("/path/to/CNNGemma/metrics/caption_metrics")  # a path, loads offline
    >>> metric.compute(
    ...     predictions=["two planes on the runway"],
    ...     references=[["Two planes are parked on the runway .", "There are two planes near the runway ."]],
    ... )  # doctest: +SKIP
    {'bleu_1': ..., 'bleu_2': ..., 'bleu_3': ..., 'bleu_4': ..., 'meteor': ..., 'rouge_l': ..., 'cider': ...}
"""

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and Dollar, Piotr
          and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

# Characters Java's PTBTokenizer (-preserveLines) would take for line breaks: they would shift every later caption
# onto the wrong image, so they become spaces like pycocoevalcap's own "\n" replacement.
_LINE_BREAKS = re.compile("[\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
_PTB_JAR = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)


def check_inputs(predictions, references) -> None:
    """Raise TypeError/ValueError naming what was received when the inputs are not `list[str]`, `list[list[str]]`."""
    for name, value in (("predictions", predictions), ("references", references)):
        if not isinstance(value, list | tuple):
            raise TypeError(
                f"{name} must be a list (one entry per image); received {type(value).__name__}: {value!r:.80}."
            )
    if len(predictions) != len(references):
        raise ValueError(
            f"Received {len(predictions)} predictions but {len(references)} reference lists; expected one list of "
            "reference captions per prediction."
        )
    if not predictions:
        raise ValueError("Received 0 predictions; expected at least one caption to score.")
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise TypeError(
                f"predictions[{i}] is {type(prediction).__name__} ({prediction!r:.80}); expected a str caption."
            )
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not isinstance(refs, list | tuple):
            raise TypeError(
                f"references[{i}] is {type(refs).__name__} ({refs!r:.80}); expected a list of reference captions, "
                "e.g. ['a plane on the runway', 'two planes'] (wrap a single reference in a list)."
            )
        if not refs:
            raise ValueError(
                f"references[{i}] is an empty list; each prediction needs at least one reference caption."
            )
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise TypeError(f"references[{i}][{j}] is {type(ref).__name__} ({ref!r:.80}); expected a str caption.")


def java_available() -> bool:
    return shutil.which("java") is not None


def ptb_tokenize(captions: dict) -> dict:
    """coco-caption's tokenisation of {key: [caption, ...]}: pycocoevalcap's PTBTokenizer call (the same jar, flags
    and punctuation filter), with Java's stderr captured. Java logs "PTBTokenizer tokenized N tokens at ..." there on
    every call, which stays out of the user's terminal; when Java fails, the error shows it."""
    keys = [key for key, caps in captions.items() for _ in caps]
    text = "\n".join(_LINE_BREAKS.sub(" ", c).replace("\n", " ") for caps in captions.values() for c in caps)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "captions.txt").write_bytes(text.encode())
        command = ["java", "-cp", str(_PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines"]
        java = subprocess.run([*command, "-lowerCase", "captions.txt"], cwd=folder, capture_output=True)
    lines = java.stdout.decode().split("\n")
    if java.returncode or len(lines) < len(keys):
        raise RuntimeError(
            f"Java's PTBTokenizer failed (exit code {java.returncode}, {len(lines)} lines for {len(keys)} captions); "
            "check that `java -version` runs (Java 8 or later). Its stderr: "
            f"{java.stderr.decode(errors='replace').strip()[-2000:]}"
        )
    tokenized = {}
    for key, line in zip(keys, lines):
        words = [word for word in line.rstrip().split(" ") if word not in ptbtokenizer.PUNCTUATIONS]
        tokenized.setdefault(key, []).append(" ".join(words))
    return tokenized


# Pure-Python stand-in for `java edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase` followed by
# pycocoevalcap's punctuation filter (tokenizer/ptbtokenizer.py). Note that -lowerCase turns -LRB- into -lrb-, which
# that filter (upper-case names) no longer removes: kept here too.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_REMOVED = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_TOKEN = re.compile(r"(?:[^\W\d_]\.){2,}(?!\w)|\d+(?:[.,:]\d+)+|@?\w+(?:[-/'.]\w+)*|\S")
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "wanna": ["wan", "na"], "gotta": ["got", "ta"]}


def python_tokenize(caption: str) -> str:
    text = caption.lower().translate({0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"'})
    text = re.sub("[\u200b\u200c\u200d\ufeff]", "", text)
    tokens = []
    for token in _TOKEN.findall(text):
        if token in _BRACKETS:
            tokens.append(_BRACKETS[token])
        elif token in _SPLIT_WORDS:
            tokens.extend(_SPLIT_WORDS[token])
        elif match := _CONTRACTION.match(token):
            tokens.extend(match.groups())
        elif token not in _REMOVED:
            tokens.append(token)
    return " ".join(tokens)


def _meteor_score(meteor: Meteor, gts: dict, res: dict) -> float:
    try:
        score, _ = meteor.compute_score(gts, res)
    except ValueError as err:  # the JVM died: readline() gave b"" instead of a score
        stderr = (
            meteor.meteor_p.stderr.read1(4000).decode(errors="replace") if meteor.meteor_p.poll() is not None else ""
        )
        raise RuntimeError(f"METEOR's Java process failed ({err}); its stderr: {stderr!r}") from err
    return float(score)


def _close(meteor: Meteor) -> None:
    # Meteor.__del__ blocks forever on its lock if compute_score raised while holding it: stop the JVM here.
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    if meteor.lock.locked():
        meteor.lock.release()


def compute_caption_metrics(predictions, references, with_meteor: bool = True) -> dict:
    """Corpus scores of `predictions` (list[str]) against `references` (list[list[str]]) as coco-caption computes them:
    {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}; "meteor" is None without Java, and with
    `with_meteor=False`, which spares METEOR's JVM start (~7 s) when many small sets are scored."""
    check_inputs(predictions, references)
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [prediction] for i, prediction in enumerate(predictions)}
    java = java_available()
    if not java:
        warnings.warn(NO_JAVA_WARNING, UserWarning, stacklevel=2)
        gts = {i: [python_tokenize(c) for c in caps] for i, caps in gts.items()}
        res = {i: [python_tokenize(c) for c in caps] for i, caps in res.items()}
    # Start METEOR's JVM (~7 s to load its paraphrase table) first so that it loads while the rest is computed.
    meteor = Meteor() if java and with_meteor else None
    try:
        if java:
            # Tokenised as COCOEvalCap.evaluate does it: references and predictions in two separate calls.
            gts, res = ptb_tokenize(gts), ptb_tokenize(res)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge_l, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        meteor_score = None if meteor is None else _meteor_score(meteor, gts, res)
    finally:
        if meteor is not None:
            _close(meteor)
    scores = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores.update(meteor=meteor_score, rouge_l=float(rouge_l), cider=float(cider))
    return {key: scores[key] for key in METRIC_KEYS}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionMetrics(evaluate.Metric):
    """coco-caption metrics. Load: `evaluate.load("/path/to/CNNGemma/metrics/caption_metrics")`."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap", "https://github.com/tylin/coco-caption"],
            reference_urls=["https://arxiv.org/abs/1504.00325"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Score `predictions` (list[str]) against `references` (list[list[str]]); the keys are listed below."""
        # Check before evaluate's Arrow encoding, whose errors on these inputs do not say which item is wrong.
        if predictions is not None or references is not None:
            check_inputs(predictions, references)
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references):
        return compute_caption_metrics(predictions, references)

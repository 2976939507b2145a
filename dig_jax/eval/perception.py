"""Perception benchmarks from JSONL: yes/no (POPE), multiple choice (CV-Bench, VSR-style), MMVP pairs.

None of these is in the tensorflow-datasets catalogue and no package ships their data, so they are read
from the JSONL files users of lmms-eval and VLMEvalKit already have, one record per question:
  id        str | int      the question's id (MMVP: its Index 1..300, the pair being (id - 1) // 2)
  image     str            image path, relative to the JSONL file's directory (or `images`: a list)
  question  str
  options   list[str] | {"A": str, ...} | "(a) ... (b) ..."   multiple choice only
  answer    "yes" | "no" (yesno); a letter ("A", "(b)") or an option's text (mcq, mmvp)
  task      str            optional subset (POPE: random / popular / adversarial; `category` also read)
  pair      int            optional (mmvp): the pair id, instead of the one derived from `id`
Every question of one file has the same number of images.

Kinds (`eval.perception.benchmarks` entries "kind:path"; a benchmark is named by its file's stem):
  yesno  prompt "{question}\\nPlease answer yes or no."; metrics accuracy, precision, recall, f1 (yes is
         the positive class), yes_ratio (answers that say yes), invalid_rate, overall and per task.
  mcq    prompt "{question}\\nA. ...\\nB. ...\\nAnswer with the option's letter from the given choices
         directly."; metrics accuracy and invalid_rate, overall and per task.
  mmvp   mcq, plus pair_accuracy: a pair counts when both of its questions are right (MMVP's own metric).
Answer extraction is deterministic (`extract_yes_no`, `extract_choice`): the answer after a thinking
block, then the first rule that applies; an answer no rule reads is invalid (counted wrong, and as
not-yes), never an error. Benchmarks whose scoring needs an LLM judge (MM-Vet, the free-form parts of
MMBench / MMStar) are out of scope.
"""
from __future__ import annotations

import collections
import json
import os
import re
import string
from typing import TYPE_CHECKING

import grain
import jax
import numpy as np

from dig_jax import multihost
from dig_jax.eval.greedy import GreedyAnswers
from dig_jax.eval.outputs import write_outputs
from dig_jax.processing.questions import QuestionBuilder, QuestionSpec

if TYPE_CHECKING:
    from dig_jax.eval.registry import EvalContext

KINDS = ("yesno", "mcq", "mmvp")
YES_NO_SUFFIX = "Please answer yes or no."
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
_THINK_CLOSE = re.compile(r"</think\s*>", re.IGNORECASE)


def final_answer(text: str, thinking: bool) -> str:
    """The answer after the last `</think>`; with `thinking` (the prompt opened the block) nothing when
    the completion never closed it."""
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        return text[closes[-1].end():]
    return "" if thinking else text


def extract_yes_no(text: str) -> str | None:
    """"yes" / "no": the first of the two words in the answer (any case, any punctuation); None if neither."""
    match = re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
    return match.group(1).lower() if match else None


def extract_choice(text: str, options: list[str]) -> str | None:
    """The letter ("A", ...) the answer chooses among `options`, or None. Rules, first that applies:
    the answer is a letter alone ("B", "(b)", "B."); "answer is B" / "answer: (B)"; a letter in
    parentheses "(B)"; a leading "B." / "B)" / "B:"; the text of exactly one option (case-insensitive)."""
    letters = string.ascii_uppercase[:len(options)]
    body = text.strip()
    rules = (r"^\(?([A-Za-z])\)?[.:)]?$", r"answer(?: is|:)?\s*:?\s*\(?([A-Za-z])\b\)?",
             r"\(([A-Za-z])\)", r"^([A-Za-z])[.:)](?:\s|$)")
    for rule in rules:
        match = re.search(rule, body, re.IGNORECASE)
        if match and match.group(1).upper() in letters:
            return match.group(1).upper()
    lowered = body.lower()
    named = [letters[i] for i, option in enumerate(options) if option and option.strip().lower() in lowered]
    return named[0] if len(named) == 1 else None


def parse_options(options, where: str) -> list[str]:
    """Options as a list of texts, in letter order, from a list, a {"A": ...} dict or "(a) x (b) y"."""
    if isinstance(options, list):
        return [str(o) for o in options]
    if isinstance(options, dict):
        return [str(options[k]) for k in sorted(options)]
    if isinstance(options, str):
        parts = re.split(r"\(([a-zA-Z])\)\s*", options)
        texts = [p.strip() for p in parts[2::2]]
        if texts:
            return texts
    raise ValueError(f"{where}: options must be a list, a dict of letters or '(a) ... (b) ...', got {options!r}")


def true_choice(answer, options: list[str], where: str) -> str:
    """The correct letter from an answer given as a letter or as an option's text."""
    text = str(answer).strip()
    letter = re.fullmatch(r"\(?([A-Za-z])\)?\.?", text)
    if letter and letter.group(1).upper() in string.ascii_uppercase[:len(options)]:
        return letter.group(1).upper()
    for i, option in enumerate(options):
        if option.strip().lower() == text.lower():
            return string.ascii_uppercase[i]
    raise ValueError(f"{where}: answer {answer!r} is neither an option letter nor an option of {options}")


def load_benchmark(path: str, kind: str) -> list[dict]:
    """The questions of a JSONL file, normalised: id, images (absolute paths), prompt text, truth, task,
    pair (mmvp). Raises naming the file and line for a malformed record."""
    if kind not in KINDS:
        raise ValueError(f"benchmark kind {kind!r} is not one of {KINDS}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    root, records = os.path.dirname(os.path.abspath(path)), []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            records.append(_normalise(raw, kind, root, where))
    if not records:
        raise ValueError(f"{path}: no questions")
    counts = {len(r["images"]) for r in records}
    if len(counts) > 1:
        raise ValueError(f"{path}: questions with {sorted(counts)} images; one file must have one image count")
    return records


def _normalise(raw: dict, kind: str, root: str, where: str) -> dict:
    missing = [k for k in ("id", "question", "answer") if k not in raw]
    if "image" not in raw and "images" not in raw:
        missing.append("image")
    if kind != "yesno" and "options" not in raw:
        missing.append("options")
    if missing:
        raise ValueError(f"{where}: record lacks {missing} (has {sorted(raw)})")
    images = raw["images"] if "images" in raw else [raw["image"]]
    images = [p if os.path.isabs(p) else os.path.join(root, p) for p in images]
    out = {"id": raw["id"], "images": images, "task": str(raw.get("task", raw.get("category", "all")))}
    if kind == "yesno":
        truth = str(raw["answer"]).strip().lower()
        if truth not in ("yes", "no"):
            raise ValueError(f"{where}: a yes/no answer must be 'yes' or 'no', got {raw['answer']!r}")
        out.update(options=[], truth=truth, prompt=f"{raw['question']}\n{YES_NO_SUFFIX}")
        return out
    options = parse_options(raw["options"], where)
    lines = [f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options)]
    out.update(options=options, truth=true_choice(raw["answer"], options, where),
               prompt="\n".join([str(raw["question"]), *lines, MCQ_SUFFIX]))
    if kind == "mmvp":
        if "pair" in raw:
            out["pair"] = int(raw["pair"])
        else:
            try:
                out["pair"] = (int(raw["id"]) - 1) // 2
            except (TypeError, ValueError):
                raise ValueError(f"{where}: mmvp needs integer ids (Index 1..300) or a 'pair' field, got id "
                                 f"{raw['id']!r}") from None
    return out


def yes_no_metrics(truths: list[str], preds: list[str | None]) -> dict[str, float]:
    """accuracy, precision, recall, f1 (positive: yes), yes_ratio, invalid_rate; an invalid answer is not yes."""
    t = np.asarray([x == "yes" for x in truths])
    p = np.asarray([x == "yes" for x in preds])
    right = np.asarray([a == b for a, b in zip(truths, preds)])
    tp, fp, fn = int(np.sum(t & p)), int(np.sum(~t & p)), int(np.sum(t & ~p))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": float(right.mean()), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": float(p.mean()), "invalid_rate": float(np.mean([x is None for x in preds])),
            "questions": float(len(truths))}


def choice_metrics(truths: list[str], preds: list[str | None]) -> dict[str, float]:
    return {"accuracy": float(np.mean([a == b for a, b in zip(truths, preds)])),
            "invalid_rate": float(np.mean([x is None for x in preds])), "questions": float(len(truths))}


def pair_accuracy(pairs: list[int], right: list[bool]) -> float:
    """The fraction of pairs whose every question is right."""
    by_pair = collections.defaultdict(list)
    for pair, ok in zip(pairs, right):
        by_pair[pair].append(ok)
    return float(np.mean([all(v) for v in by_pair.values()]))


def benchmark_metrics(kind: str, records: list[dict], preds: list[str | None]) -> dict[str, float]:
    """The kind's metrics over all questions and, when the file has several tasks, per task ("<task>/...")."""
    score = yes_no_metrics if kind == "yesno" else choice_metrics
    truths = [r["truth"] for r in records]
    out = score(truths, preds)
    if kind == "mmvp":
        out["pair_accuracy"] = pair_accuracy([r["pair"] for r in records], [a == b for a, b in zip(truths, preds)])
    tasks = sorted({r["task"] for r in records})
    if len(tasks) > 1:
        for task in tasks:
            rows = [i for i, r in enumerate(records) if r["task"] == task]
            out.update({f"{task}/{k}": v for k, v in score([truths[i] for i in rows],
                                                           [preds[i] for i in rows]).items()})
    return out


class _Transform:
    def __init__(self, builder: QuestionBuilder, records: list[dict]):
        self.builder, self.records = builder, records

    def __call__(self, index) -> dict[str, np.ndarray]:
        record = self.records[int(index)]
        images = []
        for path in record["images"]:
            if not os.path.exists(path):
                raise FileNotFoundError(f"question {record['id']!r}: image {path} does not exist")
            with open(path, "rb") as f:
                images.append(f.read())
        return {**self.builder(images, record["prompt"]), "index": np.int64(index)}


class PerceptionEvaluator:
    """Greedy answers to every question of `eval.perception.benchmarks`, scored by kind (module docstring).

    benchmarks: name -> (kind, records, this process's batched dataset)."""
    name = "perception"

    def __init__(self, *, answerer: GreedyAnswers, benchmarks: dict, rows_per_process: int, thinking: bool,
                 patches_per_image: int | None = None):
        self.answerer, self.benchmarks, self.rows_per_process = answerer, benchmarks, rows_per_process
        self.thinking, self.patches_per_image = thinking, patches_per_image

    @classmethod
    def from_context(cls, ctx: EvalContext) -> "PerceptionEvaluator":
        from dig_jax import assemble
        from dig_jax.eval.rec import check_patches

        c, p = ctx.c, ctx.c.eval.perception
        rows = c.eval.batch_size // jax.process_count()
        benchmarks = {}  # every benchmark's canvas is eval.perception.image_size: one patch count per image
        for entry in p.benchmarks:
            kind, _, path = entry.partition(":")
            records = load_benchmark(path, kind)
            if p.max_examples:
                records = records[:int(p.max_examples)]
            spec = QuestionSpec(family=ctx.model_cfg.family, image_cfg=assemble.image_processor_config(c, ctx.model_cfg),
                                canvas_hw=(int(p.image_size), int(p.image_size)), num_images=len(records[0]["images"]),
                                max_text_tokens=int(p.max_text_tokens), prompt_bucket=int(c.data.prompt_bucket),
                                chat_template=c.data.chat_template)
            builder = QuestionBuilder(spec, ctx.tok_path, require_real_ids=not c.model.compact_tokenizer)
            check_patches(builder, ctx.patches_per_image, "config.eval.perception.image_size")
            ds = grain.MapDataset.range(len(records))[jax.process_index()::jax.process_count()]
            name = os.path.splitext(os.path.basename(path))[0]
            if name in benchmarks:
                raise ValueError(f"config.eval.perception.benchmarks: two files named {name!r}")
            benchmarks[name] = (kind, records, ds.map(_Transform(builder, records)).batch(rows, drop_remainder=False))
        answerer = GreedyAnswers(ctx.model_cfg, ctx.tokenizer, max_new_tokens=int(p.max_new_tokens),
                                 prompt_bucket=int(c.data.prompt_bucket), mesh=ctx.mesh)
        return cls(answerer=answerer, benchmarks=benchmarks, rows_per_process=rows,
                   thinking=c.data.chat_template == "thinking", patches_per_image=builder.patches_per_image)

    def evaluate(self, model, *, step: int, out_dir: str) -> dict[str, float]:
        del step
        return self.score(lambda batch: self.answerer.answer(model, batch), out_dir)

    def score(self, answer_fn, out_dir: str) -> dict[str, float]:
        """Scores `answer_fn(global batch)` on every benchmark; "<benchmark>/<metric>" and mean_accuracy."""
        os.makedirs(out_dir, exist_ok=True)
        metrics, lines = {}, []
        for name, (kind, records, dataset) in self.benchmarks.items():
            answers: dict[int, tuple[str, str | None]] = {}
            for batch in multihost.lockstep_global_batches(dataset, self.rows_per_process,
                                                           gather=multihost.global_batch):
                for i, text in enumerate(answer_fn(batch)):
                    if batch["valid"][i]:
                        record = records[int(batch["index"][i])]
                        body = final_answer(text, self.thinking)
                        pred = extract_yes_no(body) if kind == "yesno" else extract_choice(body, record["options"])
                        answers[int(batch["index"][i])] = (text, pred)
            order = sorted(answers)
            scored = [records[k] for k in order]
            preds = [answers[k][1] for k in order]
            metrics.update({f"{name}/{k}": v for k, v in benchmark_metrics(kind, scored, preds).items()})
            lines += [{"benchmark": name, "id": r["id"], "task": r["task"], "answer": answers[k][0], "pred": pred,
                       "truth": r["truth"], "correct": pred == r["truth"]} for k, r, pred in zip(order, scored, preds)]
        metrics["mean_accuracy"] = float(np.mean([metrics[f"{name}/accuracy"] for name in self.benchmarks]))
        if jax.process_index() == 0:
            write_outputs(out_dir, lines, metrics, [])
        return metrics

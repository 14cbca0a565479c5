"""The study's single downstream score, from the per-task metrics of inference evaluation.

Definition (T5's convention, which the study follows: "accuracy averaged over GLUE, SuperGLUE and SQuAD
validation sets after fine-tuning"); every metric is on a 0-100 scale:

1. A task's score is the mean of the metrics t5 reports for it: CoLA Matthews correlation; SST-2, QNLI,
   RTE, WNLI, BoolQ, COPA, WiC, WSC accuracy; MRPC and QQP mean of F1 and accuracy; STS-B mean of
   Pearson and Spearman correlation; MNLI mean of the matched and mismatched accuracies; CB mean of
   accuracy and macro-F1 over its 3 classes; MultiRC mean of F1a (over all answers) and exact match (per
   question); ReCoRD mean of exact match and F1 (max over the gold answers); SQuAD mean of exact match
   and F1.
2. The GLUE average is the mean over its 9 task scores (CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE,
   WNLI); the SuperGLUE average over its 8 (BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC); the
   diagnostic sets (AX, AX-b, AX-g) have no validation labels and are not part of either.
3. The downstream score is the mean of the GLUE average, the SuperGLUE average and the SQuAD score:
   each benchmark weighs one third, whatever its number of tasks.

4. Offline (no TFDS): when none of the benchmarks' tasks was evaluated, the downstream score is the mean
   of the offline tasks' scores (`sa_offline_cloze`: exact match of the blanked word;
   `sa_offline_completion`: sequence accuracy, EM and F1), reported as `offline_score` too; the CPU study
   fine-tunes on the cloze task.
   It is a stand-in that lets a CPU run have a downstream axis, not comparable with the study's score.

A metric that is undefined on the predictions (NaN, e.g. a correlation of constant predictions) counts
as 0. An average is reported only when every task it averages has metrics; otherwise it is left out and
the missing tasks are listed under `missing` (when some of the benchmarks' tasks were evaluated).
"""

from __future__ import annotations

import math
from typing import Mapping

# Benchmark task -> the evaluation tasks (base names, see tasks/finetuning.py) whose scores it averages.
GLUE: dict[str, tuple[str, ...]] = {
    "cola": ("sa_glue_cola",), "sst2": ("sa_glue_sst2",), "mrpc": ("sa_glue_mrpc",), "qqp": ("sa_glue_qqp",),
    "stsb": ("sa_glue_stsb",), "mnli": ("sa_glue_mnli_matched", "sa_glue_mnli_mismatched"),
    "qnli": ("sa_glue_qnli",), "rte": ("sa_glue_rte",), "wnli": ("sa_glue_wnli",),
}
SUPER_GLUE: dict[str, tuple[str, ...]] = {
    name: (f"sa_super_glue_{name}",)
    for name in ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
}
SQUAD = "sa_squad"
OFFLINE = ("sa_offline_cloze", "sa_offline_completion")


def _finite(value) -> float:
  """The value; 0 for an undefined metric (NaN, or 'nan' as the metric files write it)."""
  value = float(value)
  return value if math.isfinite(value) else 0.0


def task_score(metrics: Mapping[str, float]) -> float:
  """The mean of a task's metrics (each on a 0-100 scale; NaN counts as 0)."""
  if not metrics:
    raise ValueError("A task without metrics has no score.")
  return sum(_finite(v) for v in metrics.values()) / len(metrics)


def downstream_score(task_metrics: Mapping[str, Mapping[str, float]]) -> dict:
  """Per-task scores, the GLUE and SuperGLUE averages, SQuAD and the downstream score.

  Args:
    task_metrics: {task base name: {metric name: value}}, as inference evaluation reports them, e.g.
      {'sa_glue_mrpc': {'f1': 88.0, 'accuracy': 84.0}, 'sa_squad': {'em': 80.1, 'f1': 88.2}, ...}.
      Offline tasks count only when no benchmark task is there (4. above); other tasks are ignored.

  Returns:
    {'task_scores': {'glue_mrpc': 86.0, ..., 'super_glue_cb': ..., 'squad': ...},
     'glue_average', 'super_glue_average', 'squad_em', 'squad_f1', 'squad_score', 'downstream_score',
     'offline_score'} with the
    averages only where all their tasks have metrics, and 'missing': [task base names] when some do not.
  """
  out: dict = {"task_scores": {}}
  missing: list[str] = []
  averages = {}
  for benchmark, table in (("glue", GLUE), ("super_glue", SUPER_GLUE)):
    scores = []
    for name, eval_tasks in table.items():
      absent = [t for t in eval_tasks if not task_metrics.get(t)]
      if absent:
        missing += absent
        continue
      score = sum(task_score(task_metrics[t]) for t in eval_tasks) / len(eval_tasks)
      out["task_scores"][f"{benchmark}_{name}"] = score
      scores.append(score)
    if len(scores) == len(table):
      averages[benchmark] = out[f"{benchmark}_average"] = sum(scores) / len(scores)
  if task_metrics.get(SQUAD):
    squad = task_metrics[SQUAD]
    out["squad_em"], out["squad_f1"] = _finite(squad["em"]), _finite(squad["f1"])
    averages["squad"] = out["squad_score"] = out["task_scores"]["squad"] = task_score(squad)
  else:
    missing.append(SQUAD)
  if len(averages) == 3:
    out["downstream_score"] = sum(averages.values()) / 3
  offline = {t: task_score(task_metrics[t]) for t in OFFLINE if task_metrics.get(t)}
  out["task_scores"].update(offline)
  benchmarks_seen = any(task_metrics.get(t) for tasks in list(GLUE.values()) + list(SUPER_GLUE.values())
                        for t in tasks) or bool(task_metrics.get(SQUAD))
  if offline and not benchmarks_seen:
    out["offline_score"] = out["downstream_score"] = sum(offline.values()) / len(offline)
  if missing and len(missing) < sum(len(t) for t in list(GLUE.values()) + list(SUPER_GLUE.values())) + 1:
    out["missing"] = missing  # (not when none of the benchmarks' tasks was evaluated at all)
  return out

"""Measuring a trained model: benchmark scorers (ScienceQA, POPE, LLaVA-Bench's judge) and evaluation during training.

Every metric scores rows of an answer file (`lvit.infer.answers`: `{"id", "answer", "reference"}`);
`lvit.eval.metrics.score_answers` picks the metric by name, as a recipe's `eval.metric` does. A benchmark either
generates answers with a model and scores them (`lvit.eval.predictions`), or scores existing outputs (`--predictions`).
"""

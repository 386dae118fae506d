"""Hooks for the tiny_pope lmms-eval task (tiny_pope.yaml): image loading, prompt, yes/no accuracy."""

from __future__ import annotations

from PIL import Image


def tiny_pope_doc_to_visual(doc):
    with Image.open(doc["image"]) as img:
        return [img.convert("RGB")]


def tiny_pope_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question'].strip()}{kw.get('post_prompt', '')}"


def normalize(text: str) -> str:
    """Lower-case, strip whitespace and trailing punctuation: 'Yes.' -> 'yes'."""
    return text.lower().strip().rstrip(".!").strip()


def tiny_pope_process_results(doc, results):
    pred = normalize(results[0])
    gold = normalize(doc["answer"])
    return {"accuracy": 1.0 if pred == gold else 0.0, "yes_ratio": 1.0 if pred == "yes" else 0.0}

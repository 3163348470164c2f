"""Evaluation metrics and the evaluator behind eval.py."""

"""Evaluation suites for `metaopt eval`: one YAML file per suite (see metaopt/evaluation.py)."""

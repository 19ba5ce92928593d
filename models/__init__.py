"""Factorizer models, baselines and the model registry (installed as ``fastnmf.models``)."""

"""Evaluation: the revisitop protocol and the GLDv2 retrieval metric."""
from irkit.eval.gldv2 import evaluate_gldv2
from irkit.eval.revisitop import evaluate_positions, evaluate_ranks, format_table, ranks_from_scores

__all__ = ["evaluate_gldv2", "evaluate_positions", "evaluate_ranks", "format_table", "ranks_from_scores"]

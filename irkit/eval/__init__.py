"""Evaluation: the revisitop protocol (rankings of any depth, or positions only), streamed +1M
evaluation, and the GLDv2 retrieval metric."""
from irkit.eval.gldv2 import evaluate_gldv2
from irkit.eval.revisitop import (DEFAULT_KAPPAS, PROTOCOLS, average_precision, check_ranks, evaluate_positions,
                                  evaluate_ranks, format_table, precision_at, protocol_sets, ranks_from_scores)
from irkit.eval.streaming import evaluate_streaming, streaming_positions

__all__ = ["DEFAULT_KAPPAS", "PROTOCOLS", "average_precision", "check_ranks", "evaluate_gldv2",
           "evaluate_positions", "evaluate_ranks", "evaluate_streaming", "format_table", "precision_at",
           "protocol_sets", "ranks_from_scores", "streaming_positions"]

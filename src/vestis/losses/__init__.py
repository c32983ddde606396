"""Metric-learning losses, one small class per method, composable like pytorch-metric-learning."""

from vestis.losses.triplet import MINING_STRATEGIES, TripletLoss, create_miner

__all__ = ["MINING_STRATEGIES", "TripletLoss", "create_miner"]

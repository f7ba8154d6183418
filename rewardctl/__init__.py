"""rewardctl: config-driven reward-model training (pairwise, ranklist, BCO, PRM) on one accelerate loop."""

__version__ = "0.1.0"

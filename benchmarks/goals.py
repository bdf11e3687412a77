"""The goals the reports judge comparisons against (:class:`metagrad.stats.Goal`)."""

from __future__ import annotations

from metagrad.stats import Goal

GOAL_4BIT = Goal(lower=-0.3)
"""The best 4-bit preset within 0.3 points of full precision (CIFAR-10)."""
GOAL_METAGRAD_INT4 = Goal(lower=-0.5)
"""The best INT4 MetaGrad setting within 0.5 points of full precision (CIFAR-10)."""
GOAL_SEEDS = (0, 1)
"""The seeds the 4-bit goal was stated for."""

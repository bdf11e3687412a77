"""The goals the reports judge comparisons against (:class:`metagrad.stats.Goal`)."""

from __future__ import annotations

from metagrad.stats import Goal

GOAL_4BIT = Goal(lower=-0.3)
"""The best 4-bit preset within 0.3 points of full precision (CIFAR-10)."""
GOAL_METAGRAD_INT4 = Goal(lower=-0.5)
"""The best INT4 MetaGrad setting within 0.5 points of full precision (CIFAR-10)."""
GOAL_SEEDS = (0, 1)
"""The seeds the 4-bit goal was stated for."""

# Step-time goals (issue 21), each an upper bound on a ratio of median step times.
GOAL_INT4_STEP = 1.15
"""The INT4 stochastic (``plain``) step against the bf16 step."""
GOAL_INT8_STEP = 0.8
"""The ``int8`` backend's step against the bf16 step."""
GOAL_METAGRAD_STEP = 1.3
"""MetaGrad's step against the step of the quantizer it corrects."""
GOAL_PRESET_STEP = 1.3
"""Every preset's step against the ``plain`` step."""

"""Graph passes of tome_fx, one job each; ``driver.apply_tome`` runs them in order."""

from .driver import BlockPlan, TomePlan, apply_tome

__all__ = ["BlockPlan", "TomePlan", "apply_tome"]

"""Reusable rewards (each returns a float tensor [N]); task plugins combine and log them."""
from mmpo.rewards.choice import choice_accuracy, choice_format, extract_choice

__all__ = ["choice_accuracy", "choice_format", "extract_choice"]

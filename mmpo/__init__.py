"""mmpo: group-relative RL post-training for multimodal and generative models."""

__version__ = "0.1.0"

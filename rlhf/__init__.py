"""contentv-rlhf: preference post-training for flow-matching video DiTs (ContentV-8B first)."""

__version__ = "0.1.0"

"""Integrations: torch.compile backend, HuggingFace Trainer, torch.distributed."""

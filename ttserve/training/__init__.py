"""Test-time fine-tuning: a fresh LoRA adapter per request, one step per selected sequence."""

from ttserve.training.trainer import TestTimeTrainer, TrainingRun, TrainingSession

__all__ = ["TestTimeTrainer", "TrainingRun", "TrainingSession"]

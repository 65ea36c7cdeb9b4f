from .medlam import MedLAMTrainer

__all__ = ["MedLAMTrainer"]

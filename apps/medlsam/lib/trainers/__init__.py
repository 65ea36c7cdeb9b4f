from .lite_medsam import LiteMedSAMTrainer
from .medlam import MedLAMTrainer

__all__ = ["LiteMedSAMTrainer", "MedLAMTrainer"]

from .lite_medsam import LiteMedSAMTrainer
from .medlam import MedLAMTrainer
from .segmentation import SegmentationTrainer

__all__ = ["LiteMedSAMTrainer", "MedLAMTrainer", "SegmentationTrainer"]

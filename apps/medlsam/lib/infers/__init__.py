from .edit import EditInfer
from .medlam import MedLAMInfer
from .medlsam import MedLSAMInfer
from .sam import SAM2DInfer, SAM3DInfer

__all__ = ["EditInfer", "MedLAMInfer", "MedLSAMInfer", "SAM2DInfer", "SAM3DInfer"]

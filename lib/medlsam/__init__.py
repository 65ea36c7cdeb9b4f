"""MedLSAM: localise organs in CT with MedLAM, segment them with a SAM-family model."""

from medlsam.errors import MedLSAMError

__all__ = ["MedLSAMError"]
__version__ = "0.1.0"

"""What the `medlsam` subcommands share: the MedLAM model they load, the DICOM extra they may need."""

from __future__ import annotations

from medlsam.errors import MedLSAMError


def load_model(path: str | None):
    """The MedLAM checkpoint at ``path``, or the shipped one."""
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path

    return load_medlam(path or default_medlam_path())


def require_dicom() -> None:
    """MedLSAMError naming the extra to install when pydicom is missing."""
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise MedLSAMError("medlsam dicom needs the dicom extra: pip install 'medlsam[dicom]'") from None

"""Scans in and out: image headers checked before voxels, volumes, the localisation grid, DICOM series and SEG."""

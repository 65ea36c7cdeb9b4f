"""Radiotherapy DICOM: RT Structure Sets read onto a CT series, written, imported; ROI names."""

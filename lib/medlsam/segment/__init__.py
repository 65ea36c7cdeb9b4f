"""Automatic segmentation: prompts from the localisation, SAM-family segmenters, assembly, outputs, batches."""

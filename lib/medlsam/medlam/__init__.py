"""MedLAM, the self-supervised 3D localisation network: model, patch encoding, training, matching."""

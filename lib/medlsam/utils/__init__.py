"""Small shared helpers: atomic writes, cancellation, devices, torch.distributed, geometry, metrics, plain names."""

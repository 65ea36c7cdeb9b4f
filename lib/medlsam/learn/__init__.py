"""A segmentation network learnt from the datastore's final labels, beside the few-shot template prior.

- ``options``: the trainer's options (checked, with clear errors).
- ``fewshot``: the template prior of the *other* labels (one-template banks, leave-one-out priors, prior cuts).
- ``grid``: the model grid (canonical orientation, per-axis spacing) and the maps to and from a scan's voxels.
- ``data``: labelled scans brought to the model grid (image, prior channels, organ masks, which organs are known).
- ``network``: the network builder; ``loss``: Dice + cross-entropy with each unknown organ's loss masked.
- ``patches``: training patches; ``loop``: the training loop (device, torch.distributed ranks, best state);
  ``checkpoint``: the resumable run state in the cache folder.
- ``trainer``: ``learn``: the held-out split, the few-shot priors, training, the held-out score (and the model in
  use's, on the labels it never saw) and the per-organ choice; ``model``: save / load.
- ``predict``: per-organ probabilities on a scan's own grid, the choice applied; ``cli``: ``medlsam learn``.
"""

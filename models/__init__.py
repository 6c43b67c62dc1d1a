"""Models: MaSSFormer (backbone, HR pixel decoder, masked-attention transformer decoder) and friends.

Kept import-light on purpose (no package re-exports anything): import the submodule you need, e.g.
``from addclass.models.build import build_massformer_tiny``. Layout:

- ``massformer/``, ``mask2former/``, ``maskformer/``, ``semask/``: one package per architecture; ``parts/``: what
  they share (ResNet backbone, position encodings, masked-attention decoder); ``importers/``: released checkpoints
- ``build.py`` (one builder per variant over one private builder), ``weights.py`` (loading), ``macs.py``,
  ``release.py`` (the release's numbers), ``pretrained/`` (the demo's shipped base model)
- ``training/``: criterion, matcher, loss weights, point sampling, targets, optimiser recipes
- ``labelers/``: Grounded-SAM and the simulated labeler, with their weights, caches and `LabelRecord`
- ``metrics.py`` (mIoU, Boundary IoU, Boundary F1), ``palette.py`` (label-map colours) and ``hashing.py``
  (the file sha256s and JSON identity hashes that get persisted) stay at the top

Glossary for shape comments in this package:

- B: batch size
- Q: number of object queries
- K: number of semantic classes; class logits have K+1 entries, the last one is "no object"
- C: channels (D: transformer width, where both appear)
- H, W: spatial size (h, w for a feature map at some stride s, i.e. ceil(H / s) x ceil(W / s))
- P: number of sampled points
- G: ground-truth segments in one image
- N: images or instances
"""

"""Models: MaSSFormer (backbone, HR pixel decoder, masked-attention transformer decoder) and friends.

Kept import-light on purpose: import the submodule you need, e.g.
``from models.build import build_massformer_tiny``.

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

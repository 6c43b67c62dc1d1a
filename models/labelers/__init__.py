"""Pseudo labelers behind one interface (``base.Labeler``) and one table (``build.LABELERS``, kinds
``build.LABELER_KINDS``): Grounded-SAM (``grounded_sam``: the labeler class; ``grounded_sam_detect``: the
GroundingDINO box stage; ``grounded_sam_ops``; ``grounded_sam_weights``; ``bert_offline``; ``embedding_cache``),
the simulated labeler, image inputs and label records."""

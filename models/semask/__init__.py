"""SeMask FPN: the SeMask Swin backbone, the Semantic FPN head and the fixed class head."""

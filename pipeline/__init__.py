"""Zero-shot image labelling with CLIP and LGCA, distributed with Ray Data."""

__version__ = "0.1.0"

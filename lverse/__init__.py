"""lverse: train and run L-Verse (AugVAE + BiART) on web-scale image-text data."""

__version__ = "0.1.0"

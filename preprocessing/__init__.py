"""Data preparation: the caption tokenizer and synthetic image-caption data."""

"""Data preparation.

Modules:
    text_tokenizer  CaptionTokenizer (SentencePiece BPE, BPE-dropout, BiART id mapping),
                    normalize_caption, iter_captions
    synthetic       draw_sample: procedurally drawn image-caption pairs (tests and the demo)
"""

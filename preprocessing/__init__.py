"""Data preparation.

Modules:
    text_tokenizer  CaptionTokenizer (SentencePiece BPE, BPE-dropout, BiART id mapping),
                    normalize_caption, iter_captions
    synthetic       draw_sample: procedurally drawn image-caption pairs (tests and the demo)
    synthetic_server SyntheticSet, SyntheticServer: that set and bad URLs over HTTP on 127.0.0.1
    coco            prepare_coco: MS-COCO (Karpathy's splits, local images) -> shards, references, prompts
"""

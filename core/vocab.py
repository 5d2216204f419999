"""The caption vocabulary's size, one number two layers need: the tokenizer fits this many pieces
(``CaptionTokenizer.fit``) and BiART's text range holds them (``BiARTConfig.text_vocab``). It is
the paper's: 49,808 BPE pieces. A run's real size is read from its tokenizer file; this is only
the default where none is given."""

VOCAB_SIZE = 49808

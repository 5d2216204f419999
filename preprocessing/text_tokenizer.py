"""The caption tokenizer: SentencePiece BPE over normalised captions, with BPE-dropout.

Sennrich et al. 2016 (BPE); Provilkov et al. 2020, "BPE-Dropout" (arXiv:1910.13267). L-Verse fits
49808 pieces on its captions and applies BPE-dropout 0.1 while training BiART; the pieces are fitted
without dropout and encoded deterministically for evaluation and generation.

Piece ids map into BiART's text range by an offset (the image vocabulary size): piece i is BiART id
``offset + i``, and ``offset + vocab_size`` is BiART's PAD, which also ends a caption.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable

import ftfy
import numpy as np
import sentencepiece as spm
import torch
from torch import Tensor

from lverse.core.errors import InputError

log = logging.getLogger(__name__)

_SPACES = re.compile(r"\s+")
VOCAB_SIZE = 49808  # pieces of the paper's caption tokenizer: the default everywhere a vocabulary size is asked


def normalize_caption(text: str) -> str:
    """Fix mojibake and HTML entities (ftfy), collapse whitespace, strip."""
    return _SPACES.sub(" ", ftfy.fix_text(text)).strip()


class CaptionTokenizer:
    """Captions <-> BiART text ids.

    Args:
        model_path: a SentencePiece ``.model`` file written by ``fit``.
        offset: BiART id of piece 0 (BiART's ``text_offset``, the image vocabulary size).
        dropout: BPE-dropout probability applied by ``encode(..., training=True)``.
    """

    def __init__(self, model_path: str, offset: int = 8192, dropout: float = 0.1):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model {model_path} does not exist; fit one with "
                                    "`lverse tokenizer`")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self.sp.get_piece_size()
        self.offset, self.dropout = offset, dropout
        self._piece_ids = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                           if not (self.sp.is_control(i) or self.sp.is_unknown(i))}
        self._scores = [self.sp.get_score(i) for i in range(self.vocab_size)]

    @property
    def pad_id(self) -> int:
        return self.offset + self.vocab_size

    @classmethod
    def fit(cls, captions: Iterable[str], output_prefix: str, vocab_size: int = VOCAB_SIZE,
            max_sentences: int = 10_000_000, **kwargs) -> CaptionTokenizer:
        """Fit a BPE model on ``captions`` and write ``{output_prefix}.model`` and ``.vocab``.

        No dropout while fitting. ``max_sentences`` caps the captions SentencePiece samples, so
        CC12M-sized inputs fit in memory. Extra keyword arguments go to the tokenizer.
        """
        folder = os.path.dirname(os.path.abspath(output_prefix))
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            prefix = os.path.join(tmp, "spm")
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=(c for c in map(normalize_caption, captions) if c),
                    model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
                    character_coverage=0.9995, input_sentence_size=max_sentences,
                    shuffle_input_sentence=True, num_threads=os.cpu_count() or 1,
                    # Only UNK is special: BiART adds its own PAD and start tokens.
                    unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2)
            except RuntimeError as e:
                if "Vocabulary size" in str(e):
                    raise InputError(f"{vocab_size} pieces is more than these captions support "
                                     f"({e}); pass a smaller vocab_size or more captions") from e
                raise
            for ext in (".model", ".vocab"):  # rename into place: no half-written model
                os.replace(prefix + ext, output_prefix + ext)
        log.info("wrote %s.model (%d pieces)", output_prefix, vocab_size)
        return cls(output_prefix + ".model", **kwargs)

    def pieces(self, text: str, training: bool = False, rng: np.random.Generator | None = None) -> list[int]:
        """SentencePiece ids of one caption; BPE-dropout only when ``training``, drawn from ``rng``.

        SentencePiece's own sampling cannot be reproduced across processes (the same seed gives
        other pieces in another process: measured), and exact resume needs a caption's pieces to
        depend only on its seed, so the dropout merges are done here (``_bpe_dropout``)."""
        text = normalize_caption(text)
        if training and self.dropout > 0:
            return self._bpe_dropout(text, rng if rng is not None else np.random.default_rng())
        return self.sp.encode(text)

    def _bpe_dropout(self, text: str, rng: np.random.Generator) -> list[int]:
        """BPE with each candidate merge skipped with probability ``dropout`` at every step
        (Provilkov et al. 2020, section 2): start from characters, repeatedly merge the adjacent
        pair whose merged piece has the best score (SentencePiece's BPE scores are merge ranks)."""
        sp = self.sp
        symbols = [c for piece in sp.encode(text, out_type=str) for c in piece]  # normalised characters
        while len(symbols) > 1:
            best, best_score = None, None
            skip = rng.random(len(symbols) - 1) < self.dropout
            for i in range(len(symbols) - 1):
                merged = symbols[i] + symbols[i + 1]
                pid = self._piece_ids.get(merged)
                if pid is None or skip[i]:
                    continue
                score = self._scores[pid]
                if best_score is None or score > best_score:
                    best, best_score = i, score
            if best is None:
                break
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        unk, ids = sp.unk_id(), []
        for sym in symbols:  # a run of unknown characters is one unknown piece, as in SentencePiece
            pid = self._piece_ids.get(sym, unk)
            if not (pid == unk and ids and ids[-1] == unk):
                ids.append(pid)
        return ids

    def encode(self, texts: list[str], length: int, training: bool = False,
               rngs: list[np.random.Generator] | None = None) -> Tensor:
        """(B, length) BiART ids: pieces shifted by ``offset``, truncated, PAD-filled."""
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.pieces(text, training, None if rngs is None else rngs[row])[:length]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long) + self.offset
        return out

    def decode(self, ids: Tensor | list[int]) -> str:
        """BiART ids -> a clean string: stops at the first PAD, skips ids outside the text range."""
        pieces = []
        for i in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if i == self.pad_id:
                break
            if self.offset <= i < self.pad_id:
                pieces.append(i - self.offset)
        return normalize_caption(self.sp.decode(pieces))


def iter_captions(path: str) -> Iterable[str]:
    """Captions from a text file (one per line) or a Conceptual Captions TSV, either layout
    (CC3M ``caption<TAB>url``, CC12M ``url<TAB>caption``: the field that is not a URL)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            text = next((x for x in fields if not x.startswith(("http://", "https://"))), "")
            if text.strip():
                yield text

"""The caption tokenizer: SentencePiece BPE over normalised captions, with BPE-dropout.

Sennrich et al. 2016 (BPE); Provilkov et al. 2020, "BPE-Dropout" (arXiv:1910.13267). L-Verse fits
49808 pieces on its captions and applies BPE-dropout 0.1 while training BiART; the pieces are fitted
without dropout and encoded deterministically for evaluation and generation.

Piece ids map into BiART's text range by an offset (the image vocabulary size): piece i is BiART id
``offset + i``, and ``offset + vocab_size`` is BiART's PAD, which also ends a caption.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
from collections.abc import Iterable

import ftfy
import numpy as np
import sentencepiece as spm
import torch
from torch import Tensor

from lverse.core.errors import InputError
from lverse.core.files import atomic_output
from lverse.core.vocab import VOCAB_SIZE

from . import _bpe

log = logging.getLogger(__name__)

def normalize_caption(text: str) -> str:
    """Fix mojibake and HTML entities (ftfy), collapse whitespace, strip.

    Printable ASCII without ``&`` skips ftfy, which returns it unchanged: every fix it applies
    acts on an HTML entity (which starts with ``&``), on a control character or on a character
    outside ASCII, and NFC leaves ASCII as it is (tests/test_data_order.py checks this). Most
    captions are such text, and ftfy costs more than the rest of a caption's BPE-dropout."""
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
    return " ".join(text.split())  # str.split's whitespace is the regular expression \s's


def truncate_caption(caption: str) -> str:
    """The caption up to and including its first full stop, one that ends the text or is followed
    by a space (so "3.5" stays whole): what `lverse caption` keeps as ``caption``, and the truncated
    rows of the paper's Table 2 (BiART goes on after its first sentence). A caption without one,
    or with nothing before it, is returned whole (stripped)."""
    m = re.match(r"\s*(.*?\S.*?\.)(?:\s|$)", caption, flags=re.DOTALL)
    return m.group(1) if m else caption.strip()


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
        # Words are merged one by one where no piece spans two (SentencePiece's default,
        # split_by_whitespace); a model fitted otherwise is merged over the whole caption.
        self._word_split = not any("\u2581" in piece[1:] for piece in self._piece_ids)
        self._unk = self.sp.unk_id()

    @property
    def pad_id(self) -> int:
        return self.offset + self.vocab_size

    @classmethod
    def fit(cls, captions: Iterable[str], output_prefix: str, vocab_size: int = VOCAB_SIZE,
            max_sentences: int = 10_000_000, **kwargs) -> CaptionTokenizer:
        """Fit a BPE model on ``captions`` and write ``{output_prefix}.model`` and ``.vocab``.

        No dropout while fitting. ``max_sentences`` caps the captions SentencePiece samples, so
        CC12M-sized inputs fit in memory. Extra keyword arguments go to the tokenizer. The same
        captions give the same bytes: the model is taken from SentencePiece in memory, since a model
        it writes to a file records that file's name (a temporary one would differ each time, and
        so would the tokenizer's sha256, which models record as their provenance).
        """
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(c for c in map(normalize_caption, captions) if c),
                model_writer=model, model_type="bpe", vocab_size=vocab_size,
                character_coverage=0.9995, input_sentence_size=max_sentences,
                shuffle_input_sentence=True, num_threads=os.cpu_count() or 1,
                # Only UNK is special: BiART adds its own PAD and start tokens.
                unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2)
        except RuntimeError as e:
            if "Vocabulary size" in str(e):
                raise InputError(f"{vocab_size} pieces is more than these captions support "
                                 f"({e}); pass a smaller vocab_size or more captions") from e
            raise
        sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
        # SentencePiece's own .vocab: each piece and its score, a line each, in id order
        vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
        for ext, content in ((".vocab", vocab.encode()), (".model", model.getvalue())):  # the model last
            with atomic_output(output_prefix + ext) as tmp, open(tmp, "wb") as f:
                f.write(content)
        log.info("wrote %s.model (%d pieces)", output_prefix, vocab_size)
        return cls(output_prefix + ".model", **kwargs)

    def pieces(self, text: str, training: bool = False, seed: bytes | None = None) -> list[int]:
        """SentencePiece ids of one caption; BPE-dropout only when ``training``, its draws a function
        of ``seed`` alone (a fresh random seed when None).

        SentencePiece's own sampling cannot be reproduced across processes (the same seed gives
        other pieces in another process: measured), and exact resume needs a caption's pieces to
        depend only on its seed, so the dropout merges are done here (``_bpe_dropout``)."""
        text = normalize_caption(text)
        if training and self.dropout > 0:
            return self._bpe_dropout(text, seed if seed is not None else os.urandom(16))
        return self.sp.encode(text)

    def _bpe_dropout(self, text: str, seed: bytes) -> list[int]:
        """BPE-dropout (Provilkov et al. 2020) word by word: each word (a ``▁`` and what follows up
        to the next one; no piece spans two) starts from its characters, and every step looks at
        the word's mergeable adjacent pairs from the best-scoring merged piece down (SentencePiece's
        BPE scores are merge ranks; of equal scores the leftmost pair first), drops each one it
        looks at with probability ``dropout`` and merges the first it keeps; a step that keeps none
        ends the word. Each pair looked at takes the next draw of the caption's stream, words in
        order. Drawing only for the pairs looked at gives the distribution of drawing for every
        pair at every step, with about one draw per merge (tests/test_data_order.py checks this).
        Words are independent, as in BPE's merges; run over a whole caption at once, the rule
        would couple them only through its end (a step that drops every pair of every word would
        end them all), which no merge rule of the paper relies on.

        Draw j is the j-th little-endian 16-bit word of SHAKE-128(``seed``) and drops when it is
        below ``round(dropout * 65536)`` (a probability within 2^-17 of ``dropout``): an
        extendable-output hash, squeezed as far as the caption's words need.

        The loop is C (``_bpe``; ``encode_into`` does a batch of captions in one call). Most words
        take no drop in their few merges and end as plain BPE ends them: each word's plain pieces
        and merge count are cached (in ``_merger``), so such a word costs a search of its draws for a drop; a
        word with a drop is merged again from its characters, its plain merges replayed by the
        draws that keep them (``benchmarks/data.py``)."""
        chars = self.sp.normalize(text)
        words = _WORD.findall(chars) if self._word_split else [chars]
        return self._merger.dropout(words, seed, self._threshold)

    @property
    def _threshold(self) -> int:
        return round(self.dropout * 65536)

    @functools.cached_property
    def _merger(self) -> _bpe.Merger:
        """The C side of BPE-dropout: the merge table, every two pieces whose concatenation is a
        piece, keyed (left << 32 | right), and that piece with its rank (rank << 32 | piece), the
        rank its place in the scores, best first (equal scores, equal ranks: the leftmost pair
        goes first); the one-character pieces (a character that is none is unknown, and in no
        pair: SentencePiece makes its pieces of the characters it keeps, each of which is a
        piece); and the cache of words' plain BPE, ``_PLAIN_WORDS`` of them. Made in the process
        that uses it (not pickled: ``__getstate__``)."""
        ranks = {score: r for r, score in enumerate(sorted(set(self._scores), reverse=True))}
        pairs = {}
        for piece, merged in self._piece_ids.items():
            for cut in range(1, len(piece)):
                left, right = self._piece_ids.get(piece[:cut]), self._piece_ids.get(piece[cut:])
                if left is not None and right is not None:
                    pairs[left << 32 | right] = ranks[self._scores[merged]] << 32 | merged
        chars = {piece: i for piece, i in self._piece_ids.items() if len(piece) == 1}
        return _bpe.Merger(np.fromiter(pairs.keys(), np.uint64, len(pairs)).tobytes(),
                           np.fromiter(pairs.values(), np.uint64, len(pairs)).tobytes(), chars, self._unk, _PLAIN_WORDS)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_merger"}

    def encode(self, texts: list[str], length: int, training: bool = False,
               seeds: list[bytes] | None = None) -> Tensor:
        """(B, length) BiART ids: pieces shifted by ``offset``, truncated, PAD-filled; BPE-dropout
        when ``training``, each caption's from its ``seeds`` entry."""
        out = np.empty(len(texts) * length, dtype=np.int64)
        self.encode_into(out, texts, length, training, seeds)
        return torch.from_numpy(out).view(len(texts), length)

    def encode_into(self, out: np.ndarray, texts: list[str | bytes], length: int, training: bool = False,
                    seeds: list[bytes] | None = None) -> None:
        """``encode`` written into ``out``, flat (B * length; uint16, int32 or int64, which the ids
        must fit); a caption may be UTF-8 bytes. With BPE-dropout, the captions of printable ASCII
        are done in C in one call (``_bpe.Merger.encode``: most captions), the others here one by one."""
        if (out.dtype not in (np.uint16, np.int32, np.int64) or out.shape != (len(texts) * length,)
                or self.pad_id > np.iinfo(out.dtype).max):
            raise ValueError(f"encode_into needs a flat array of {len(texts)} x {length} uint16, int32 or int64 "
                             f"that hold ids up to {self.pad_id}")
        texts = list(texts)
        if training and self.dropout > 0:
            seeds = list(seeds) if seeds is not None else [os.urandom(16) for _ in texts]
            rows = range(len(texts))
            if self._ascii_words:
                rows = self._merger.encode(out, texts, seeds, self._threshold, length, self.vocab_size, self.offset)
        else:
            rows, seeds = range(len(texts)), [None] * len(texts)
        for row in rows:
            text = texts[row]
            ids = self.pieces(text.decode("utf-8", "replace") if isinstance(text, bytes) else text, training,
                              seeds[row])[:length]
            at = out[row * length:(row + 1) * length]
            at[:len(ids)] = ids
            at[len(ids):] = self.vocab_size
            at += self.offset

    @functools.cached_property
    def _ascii_words(self) -> bool:
        """Whether ``_bpe.Merger.encode`` serves this model: its words split at whitespace, and its
        normalisation leaves printable ASCII as it is, but for a U+2581 before the text and for each
        space (SentencePiece's default, nmt_nfkc, does; a model with its own rules may not: then
        every caption takes the path through ``pieces``)."""
        probe = "".join(chr(c) for c in range(0x21, 0x7F))
        probe = " ".join([probe, probe[::-1], probe[::2], "a b  c"])
        expected = "\u2581" + " ".join(probe.split()).replace(" ", "\u2581")
        return self._word_split and self.sp.normalize(probe) == expected

    def decode(self, ids: Tensor | list[int]) -> str:
        """BiART ids -> a clean string: stops at the first PAD, skips ids outside the text range."""
        pieces = []
        for i in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if i == self.pad_id:
                break
            if self.offset <= i < self.pad_id:
                pieces.append(i - self.offset)
        return normalize_caption(self.sp.decode(pieces))


_WORD = re.compile("\u2581[^\u2581]*|[^\u2581]+")  # a word: its ▁ and what follows up to the next
_PLAIN_WORDS = 1 << 18  # words whose plain BPE is cached (all dropped when there would be more)


def iter_captions(path: str) -> Iterable[str]:
    """Captions from a text file (one per line) or a Conceptual Captions TSV, either layout
    (CC3M ``caption<TAB>url``, CC12M ``url<TAB>caption``: the field that is not a URL)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            text = next((x for x in fields if not x.startswith(("http://", "https://"))), "")
            if text.strip():
                yield text

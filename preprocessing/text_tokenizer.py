"""The caption tokenizer: SentencePiece BPE over normalised captions, with BPE-dropout.

Sennrich et al. 2016 (BPE); Provilkov et al. 2020, "BPE-Dropout" (arXiv:1910.13267). L-Verse fits
49808 pieces on its captions and applies BPE-dropout 0.1 while training BiART; the pieces are fitted
without dropout and encoded deterministically for evaluation and generation.

Piece ids map into BiART's text range by an offset (the image vocabulary size): piece i is BiART id
``offset + i``, and ``offset + vocab_size`` is BiART's PAD, which also ends a caption.
"""

from __future__ import annotations

import hashlib
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
    """Fix mojibake and HTML entities (ftfy), collapse whitespace, strip.

    Printable ASCII without ``&`` skips ftfy, which returns it unchanged: every fix it applies
    acts on an HTML entity (which starts with ``&``), on a control character or on a character
    outside ASCII, and NFC leaves ASCII as it is (tests/test_data_order.py checks this). Most
    captions are such text, and ftfy costs more than the rest of a caption's BPE-dropout."""
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
    return _SPACES.sub(" ", text).strip()


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
        # merged piece -> minus its score: ``_merge_word`` sorts the best first
        self._neg_scores = {piece: -self._scores[i] for piece, i in self._piece_ids.items()}
        # Words are merged one by one where no piece spans two (SentencePiece's default,
        # split_by_whitespace); a model fitted otherwise is merged over the whole caption.
        self._word_split = not any("\u2581" in piece[1:] for piece in self._piece_ids)
        self._plain: dict[str, tuple[list[int], list[int]]] = {}  # word -> plain BPE (ids, merges)

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

    def pieces(self, text: str, training: bool = False, seed: bytes | None = None) -> list[int]:
        """SentencePiece ids of one caption; BPE-dropout only when ``training``, its draws a function
        of ``seed`` alone (``dropout_draws``; a fresh random seed when None).

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
        ends the word. Each pair looked at takes the next draw of the caption's stream
        (``dropout_draws(seed)``), words in order. Drawing only for the pairs looked at gives the
        distribution of drawing for every pair at every step, with about one draw per merge
        (tests/test_data_order.py checks this). Words are independent, as in BPE's merges; run
        over a whole caption at once, the rule would couple them only through its end (a step
        that drops every pair of every word would end them all), which no merge rule of the paper
        relies on.

        Most words take no drop in their few merges and end as plain BPE ends them: each word's
        plain merges and pieces are cached, so such a word costs a dictionary look-up and a search
        of its draws for a drop; a word with a drop replays its plain merges up to it and is merged
        step by step from there (``benchmarks/data.py``)."""
        chars = self.sp.normalize(text)
        words = _WORD.findall(chars) if self._word_split else [chars]
        mask = dropout_draws(seed, 2 * len(chars) + 16, self.dropout)  # about a draw a merge, and the drops
        ids, pos, plain, piece_ids, unk = [], 0, self._plain, self._piece_ids, self.sp.unk_id()
        for word in words:
            hit = plain.get(word)
            if hit is None:
                if len(plain) >= _PLAIN_WORDS:
                    plain.clear()
                symbols, merged, _ = _merge_word(list(word), self._neg_scores, bytes(len(word) ** 2), 0)
                hit = plain[word] = ([piece_ids.get(sym, unk) for sym in symbols], merged)
            word_ids, merged = hit
            if pos + len(merged) > len(mask):
                mask = dropout_draws(seed, 2 * (pos + len(merged)), self.dropout)
            first_drop = mask.find(1, pos, pos + len(merged))
            if first_drop < 0:  # no drop among its merges: the plain segmentation
                ids += word_ids
                pos += len(merged)
                continue
            worst = first_drop + len(word) * (len(word) - 1) // 2  # every pair looked at in every step
            if worst > len(mask):
                mask = dropout_draws(seed, 2 * worst, self.dropout)
            symbols = list(word)  # the plain merges up to the first drop, then the draws decide
            for i in merged[:first_drop - pos]:
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
            symbols, _, pos = _merge_word(symbols, self._neg_scores, mask, first_drop)
            ids += [piece_ids.get(sym, unk) for sym in symbols]
        if unk in ids:  # a run of unknown characters is one unknown piece, as in SentencePiece
            ids = [pid for j, pid in enumerate(ids) if not (pid == unk and j and ids[j - 1] == unk)]
        return ids

    def encode(self, texts: list[str], length: int, training: bool = False,
               seeds: list[bytes] | None = None) -> Tensor:
        """(B, length) BiART ids: pieces shifted by ``offset``, truncated, PAD-filled; BPE-dropout
        when ``training``, each caption's from its ``seeds`` entry."""
        out = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.pieces(text, training, None if seeds is None else seeds[row])[:length]
            out[row, :len(ids)] = ids
        out[out != self.pad_id] += self.offset  # no piece is numbered pad_id (offset + vocab_size)
        return torch.from_numpy(out)

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


def dropout_draws(seed: bytes, count: int, dropout: float) -> bytes:
    """The first ``count`` draws of the stream of ``seed``: byte j is 1 when draw j drops its pair.

    Draw j is the j-th little-endian 16-bit word of SHAKE-128(``seed``) and drops when it is below
    ``round(dropout * 65536)`` (a probability within 2^-17 of ``dropout``). An extendable-output
    hash: a longer stream starts with the shorter one, so a caption that needs more draws asks
    again for more and gets the same first ones; and one call makes a caption's draws (about a
    microsecond, against several for building a numpy generator per sample)."""
    words = np.frombuffer(hashlib.shake_128(seed).digest(2 * count), dtype="<u2")
    return (words < round(dropout * 65536)).tobytes()


def _merge_word(symbols: list[str], neg_scores: dict[str, float], mask: bytes, pos: int,
                ) -> tuple[list[str], list[int], int]:
    """BPE-dropout on one word's ``symbols`` step by step from draw ``pos`` on (see
    ``CaptionTokenizer._bpe_dropout``): (the symbols left, where each merge was as the index of its
    left symbol, the next draw's position). With no drops, plain BPE. A step costs two look-ups
    and a sort of the pairs' scores."""
    get, merged = neg_scores.get, []
    scores = [get(a + b) for a, b in zip(symbols, symbols[1:])]  # minus the merged piece's score
    while True:
        kept = None
        for _, i in sorted([(s, j) for j, s in enumerate(scores) if s is not None]):
            pos += 1
            if not mask[pos - 1]:
                kept = i
                break
        if kept is None:  # every pair dropped, or none mergeable: the word is done
            return symbols, merged, pos
        i = kept
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        del scores[i]
        if i:
            scores[i - 1] = get(symbols[i - 1] + symbols[i])
        if i < len(scores):
            scores[i] = get(symbols[i] + symbols[i + 1])
        merged.append(i)


def iter_captions(path: str) -> Iterable[str]:
    """Captions from a text file (one per line) or a Conceptual Captions TSV, either layout
    (CC3M ``caption<TAB>url``, CC12M ``url<TAB>caption``: the field that is not a URL)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            text = next((x for x in fields if not x.startswith(("http://", "https://"))), "")
            if text.strip():
                yield text

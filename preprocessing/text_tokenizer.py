"""The caption tokenizer: SentencePiece BPE over normalised captions, with BPE-dropout.

Sennrich et al. 2016 (BPE); Provilkov et al. 2020, "BPE-Dropout" (arXiv:1910.13267). L-Verse fits
49808 pieces on its captions and applies BPE-dropout 0.1 while training BiART; the pieces are fitted
without dropout and encoded deterministically for evaluation and generation.

Piece ids map into BiART's text range by an offset (the image vocabulary size): piece i is BiART id
``offset + i``, and ``offset + vocab_size`` is BiART's PAD, which also ends a caption.
"""

from __future__ import annotations

import heapq
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
        # merged piece -> minus its score: the heap of ``_merge_with_dropout`` pops the best first
        self._neg_scores = {piece: -self._scores[i] for piece, i in self._piece_ids.items()}

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
        pair whose merged piece has the best score (SentencePiece's BPE scores are merge ranks;
        of equal scores the leftmost pair), where step t draws ``rng.random(len(symbols) - 1)``
        and pair i is skipped when its draw is below ``dropout`` (``_merge_with_dropout``)."""
        # the normalised characters, which SentencePiece's pieces of ``text`` are made of
        symbols = _merge_with_dropout(self.sp.normalize(text), self._neg_scores, self.dropout, rng)
        unk, ids, piece_ids = self.sp.unk_id(), [], self._piece_ids
        for sym in symbols:  # a run of unknown characters is one unknown piece, as in SentencePiece
            pid = piece_ids.get(sym, unk)
            if not (pid == unk and ids and ids[-1] == unk):
                ids.append(pid)
        return ids

    def encode(self, texts: list[str], length: int, training: bool = False,
               rngs: list[np.random.Generator] | None = None) -> Tensor:
        """(B, length) BiART ids: pieces shifted by ``offset``, truncated, PAD-filled."""
        out = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.pieces(text, training, None if rngs is None else rngs[row])[:length]
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


# Draws are made for this many merge steps at a time (at least this many numbers): one call to the
# generator for the whole of a caption of up to about 128 characters.
_DRAW_CHUNK = 8192


def _merge_with_dropout(chars: str, neg_scores: dict[str, float], dropout: float,
                        rng: np.random.Generator) -> list[str]:
    """The symbols BPE with dropout leaves of ``chars`` (see ``CaptionTokenizer._bpe_dropout``).

    The same merges, from the same draws, as the plain loop (each step compares every adjacent
    pair and draws its numbers) in O(log n) a step instead of O(n): the candidate pairs wait in a
    heap ordered by (minus score, position), so a step pops the best pair and checks its draw
    (with dropout 0.1, one step in ten the next pair's too; the skipped ones go back for the next
    step). A symbol is known by where it starts in ``chars``: ``order`` holds them left to right,
    ``end[a]`` is where symbol a ends, and ``live[a]`` is the heap entry of the pair that symbol a
    starts now (None: its merge is no piece); a popped entry that is no longer live is dropped.
    Step t uses draws ``off_t .. off_t + L_t - 2`` of one stream (L_t symbols; drawing them in one
    call gives the same numbers as drawing them step by step), the pair at index r the draw
    ``off_t + r``. A PCG64 generator is left where the step-by-step draws leave it (the draws
    made beyond the last step are taken back with ``advance``, which also drops a 32-bit value
    numpy may hold back from an earlier 32-bit draw); other bit generators draw step by step.
    """
    n = len(chars)
    if n < 2:
        return list(chars)
    get, push, pop = neg_scores.get, heapq.heappush, heapq.heappop
    live, heap = [None] * n, []
    for i in range(n - 1):
        s = get(chars[i:i + 2])
        if s is not None:
            live[i] = entry = (s, i)
            heap.append(entry)
    heapq.heapify(heap)
    end = list(range(1, n + 1))
    order = list(range(n))
    stepwise = type(getattr(rng, "bit_generator", None)) not in (np.random.PCG64, np.random.PCG64DXSM)
    mask, drawn, steps_drawn = b"", 0, 0
    off, length = 0, n  # the step's first draw; symbols
    while length > 1:
        if off + length - 1 > drawn:  # draws for this step and, unless stepwise, the next ones
            m = n - 1 - steps_drawn  # the first step not drawn for draws m numbers, the next m - 1, ...
            if stepwise:
                steps, count = 1, m
            elif m * (m + 1) // 2 <= _DRAW_CHUNK:
                steps, count = m, m * (m + 1) // 2  # all the steps there can be
            else:
                steps, count = 0, 0
                while count < _DRAW_CHUNK:
                    count += m - steps
                    steps += 1
            mask += (rng.random(count) < dropout).tobytes()
            drawn, steps_drawn = drawn + count, steps_drawn + steps
        skipped = None
        while heap:
            entry = pop(heap)
            a = entry[1]
            if live[a] is not entry:
                continue
            r = order.index(a)
            if mask[off + r]:
                if skipped is None:
                    skipped = [entry]
                else:
                    skipped.append(entry)
                continue
            b = order[r + 1]  # merge symbols a and b
            e = end[a] = end[b]
            live[b] = None
            del order[r + 1]
            length -= 1
            if r:
                left = order[r - 1]
                s = get(chars[left:e])
                if s is None:
                    live[left] = None
                else:
                    live[left] = entry = (s, left)
                    push(heap, entry)
            s = get(chars[a:end[order[r + 1]]]) if r + 1 < length else None
            if s is None:
                live[a] = None
            else:
                live[a] = entry = (s, a)
                push(heap, entry)
            break
        else:  # every pair skipped (or none left): done
            off += length - 1
            break
        if skipped is not None:
            for entry in skipped:
                push(heap, entry)
        off += length  # this step's draws: one fewer than the symbols it started with
    if drawn > off:
        rng.bit_generator.advance(off - drawn)
    return [chars[a:end[a]] for a in order]


def iter_captions(path: str) -> Iterable[str]:
    """Captions from a text file (one per line) or a Conceptual Captions TSV, either layout
    (CC3M ``caption<TAB>url``, CC12M ``url<TAB>caption``: the field that is not a URL)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            text = next((x for x in fields if not x.startswith(("http://", "https://"))), "")
            if text.strip():
                yield text

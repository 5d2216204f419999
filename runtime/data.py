"""Training data: the global sample order of BiART's token shards, and the AugVAE's shard streams.

**Token shards (BiART): one global order.** The samples of the named shards are numbered
0..N-1 (``token_index.TokenSamples``, read from the folder's memory-mapped index) and training
consumes one infinite sequence of them, a function of (seed, epoch) only:

- **epoch** mode: epoch e is a permutation of the N samples drawn from (seed, e);
- **resampled** mode: epoch e is N draws with replacement, from (seed, e).

Global position p holds sample ``order_e[p % N]`` of epoch ``e = p // N``. Positions are handed
out in micro-batches: a run that starts at position P (0, or where its checkpoint left off) gives
micro-step k the positions ``[P + k*W*B, P + (k+1)*W*B)`` (W ranks, B the micro-batch), of which
rank r takes ``[P + k*W*B + r*B, P + k*W*B + (r+1)*B)``; with gradient accumulation an optimizer
step is ``grad_accum`` consecutive micro-steps. So global batch g holds the same samples whatever
W, as long as W*B is the same, each rank its slice; and a run resumed on any number of ranks or
DataLoader workers continues at exactly the sample after the last one consumed. A rank's
DataLoader worker w makes the rank's chunks w, w + workers, w + 2*workers, ... of C micro-steps
each (counted from the run's start position; C from ``handover_chunk``, so a hand-over carries
about 64 samples), and the DataLoader takes them from its workers in turn, so they arrive in order
and are split into micro-batches again. Per-sample randomness (BPE-dropout) is drawn from (seed,
epoch, the sample's key) only, so a sample's caption pieces do not depend on which rank or worker
reads it. (In resampled mode a sample drawn twice in one epoch gets the same pieces both times.)
So is the *view* of a sample whose token shards hold random crops (``lverse encode --crops K``):
each visit reads one of its K + 1 views, the centre crop or a crop, uniformly, drawn from the
same (seed, epoch, key) (``view_pick``); without crops every visit reads the centre crop.

What it costs: each worker holds the current epoch's order (4 bytes a sample below 2^31 samples,
13 MB for CC3M; drawn in well under a second at each epoch's start), and reading a sample is a
random read of the index (see ``token_index.py`` for that trade-off). In exchange there is no
shuffle buffer and no limit of ranks x workers against the number of shards. A sample costs about
20 µs of CPU from the index to the batch in one process, BPE-dropout (in C) a third of it, once
the tokenizer has cached its words' plain BPE; through DataLoader workers about 45 µs, the
hand-over through the workers' pipes included (``as_arrays``; ``benchmarks/data.py``).

**Image shards (AugVAE): streams per slot.** The AugVAE trains on JPEG shards, which are not
indexed. Each (rank, DataLoader worker) pair is a *slot*; slot s of S owns shards
``s, s+S, s+2S, ...`` of the sorted shard list, so no sample is seen twice in an epoch and a clear
error is raised when there are fewer shards than slots. A slot's stream is infinite (training is
counted in steps) and a pure function of (seed, slot): in epoch mode epoch e visits the slot's
shards in an order drawn from (seed, e, slot); in resampled mode group g draws its shards with
replacement from all shards, from (seed, g, slot). Shards are read ``shuffle_shards`` at a time (a
*group*, the shuffle buffer: every sample of the group in memory) and the group's samples are
permuted from (seed, epoch, group, slot); per-sample randomness (random crops) is seeded from
(seed, epoch, group, key). The sample counts every shard's stats file records make a position
addressable: resuming skips whole groups without reading them. Resuming is exact on the same
ranks and workers; on others each slot continues its own new stream at the same micro-batch count.

Why not webdataset's own ``shuffle``/``ResampledShards``: their RNG advances with every sample,
so resuming at sample n means replaying n samples.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lverse.core.errors import InputError
from lverse.core.shards import read_tar

log = logging.getLogger(__name__)

# The last element of each seed sequence says what it draws, so no two uses share a stream (and
# none is ``trainer.reseed``'s three-element (seed, step, rank)).
_PERMUTE, _RESAMPLE = 10, 11


# ---------------------------------------------------------------------------------------------
# token shards: the global order

@dataclass(frozen=True)
class GlobalOrder:
    """Which sample each global position holds (see the module doc): a function of (seed, epoch)
    and the number of samples, never of ranks or workers."""

    size: int  # samples
    seed: int
    resampled: bool = False

    def __post_init__(self):
        if self.size <= 0:
            raise InputError("the shards hold no samples")

    def epoch(self, e: int) -> np.ndarray:
        """The samples of epoch ``e``, in order."""
        if self.resampled:
            order = np.random.default_rng([self.seed, e, 0, _RESAMPLE]).integers(self.size, size=self.size)
        else:
            order = np.random.default_rng([self.seed, e, 0, _PERMUTE]).permutation(self.size)
        return order.astype(np.int32 if self.size < 2**31 else np.int64)

    def at(self, positions: range, cache: dict | None = None) -> list[tuple[int, int]]:
        """(epoch, sample) of each position (a range of step 1); ``cache`` keeps the epochs drawn
        (the last two)."""
        if positions.step != 1:
            raise ValueError(f"positions {positions} do not follow one another")
        cache = {} if cache is None else cache
        out, p = [], positions.start
        while p < positions.stop:  # a run of positions in one epoch at a time
            e, i = divmod(p, self.size)
            if e not in cache:
                for old in sorted(cache)[:-1]:
                    del cache[old]
                cache[e] = self.epoch(e)
            n = min(positions.stop - p, self.size - i)
            out += zip(itertools.repeat(e, n), cache[e][i:i + n].tolist())
            p += n
        return out


def sample_seed(seed: int, epoch: int, key: str) -> bytes:
    """A sample's own randomness (BPE-dropout's draws, ``CaptionTokenizer._bpe_dropout``, and its
    view, ``view_pick``), from (seed, epoch, its key) only: the three packed without ambiguity (two
    8-byte integers, then the key) after a tag (kept from when it drew BPE-dropout alone, so the
    pieces stay those of earlier runs)."""
    packed = seed.to_bytes(8, "little", signed=True) + epoch.to_bytes(8, "little")
    return b"lverse-bpe-dropout\0" + packed + key.encode()


def view_pick(seed: bytes, views: int) -> int:
    """Which of a sample's ``views`` (0: its centre crop, 1..K: its random crops) a visit reads,
    uniformly from the sample's ``sample_seed``: BLAKE2b of it, personalised so the draw shares
    nothing with BPE-dropout's (SHAKE-128 of the same bytes)."""
    if views == 1:
        return 0
    digest = hashlib.blake2b(seed, digest_size=8, person=b"lverse-view").digest()
    return int.from_bytes(digest, "little") % views  # bias below views / 2^64


class GlobalBatches(torch.utils.data.IterableDataset):
    """This rank's micro-batches of the global order from sample position ``start`` on (the
    samples consumed before this run's first micro-step), ``chunk`` micro-batches to an item.

    ``samples[i]`` is sample i (``token_index.TokenSamples``: picklable, each worker maps the index
    itself; its ``take(indices)``, when it has one, reads a batch at once; with ``views`` > 1, its
    ``keys(indices)`` and ``take(indices, views)`` read each sample in its ``view_pick``);
    ``make_batch(samples, seeds)`` (``sample_seed`` of each) turns them into tensors in the
    DataLoader worker. Use with ``batch_loader`` (or ``DataLoader(batch_size=None,
    num_workers=workers)``) and the same ``workers`` here; with ``chunk`` > 1 its items are
    ``chunk`` micro-batches one after another in one batch, which ``micro_batches`` splits again
    (``handover_chunk``).
    """

    def __init__(self, samples: Sequence[dict], order: GlobalOrder, make_batch: Callable, batch_size: int,
                 rank: int, world_size: int, workers: int, start: int = 0, chunk: int = 1):
        if len(samples) != order.size:
            raise ValueError(f"{len(samples)} samples, an order of {order.size}")
        self.samples, self.order, self.make_batch = samples, order, make_batch
        self.batch_size, self.rank, self.world_size, self.workers = batch_size, rank, world_size, max(workers, 1)
        self.start, self.chunk = start, chunk

    def positions(self, k: int) -> range:
        """The global positions of this rank's part of micro-step ``k`` (counted from ``start``)."""
        first = self.start + (k * self.world_size + self.rank) * self.batch_size
        return range(first, first + self.batch_size)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        cache: dict = {}
        for c in itertools.count(info.id if info is not None else 0, self.workers):
            picks = [pick for k in range(c * self.chunk, (c + 1) * self.chunk)
                     for pick in self.order.at(self.positions(k), cache)]
            yield self.make_batch(*self.read(picks))

    def read(self, picks: list[tuple[int, int]]) -> tuple[list[dict], list[bytes]]:
        """The samples of ``picks`` ((epoch, sample) each) and their ``sample_seed``; a sample with
        crops read in the view its seed picks (``view_pick``)."""
        indices = [i for _, i in picks]
        views = getattr(self.samples, "views", 1)
        if views > 1:  # the keys first: they say which view to read
            seeds = [sample_seed(self.order.seed, e, key) for (e, _), key in zip(picks, self.samples.keys(indices))]
            return self.samples.take(indices, [view_pick(s, views) for s in seeds]), seeds
        take = getattr(self.samples, "take", None)  # a batch read in one go (TokenSamples)
        samples = take(indices) if take is not None else [self.samples[i] for i in indices]
        return samples, [sample_seed(self.order.seed, e, s["__key__"]) for (e, _), s in zip(picks, samples)]


# A DataLoader worker hands its items to the training process at a fixed cost per item plus a
# cost per byte; handing over at least this many samples at once spreads the fixed part thin
# (benchmarks/README.md, "data.py").
HANDOVER_SAMPLES = 64


def handover_chunk(batch_size: int, workers: int) -> int:
    """Micro-batches a DataLoader worker hands over at once: enough for ``HANDOVER_SAMPLES``; one
    without workers (nothing is handed over, and a chunk would only delay the first batch)."""
    return max(1, -(-HANDOVER_SAMPLES // batch_size)) if workers else 1


def as_arrays(item: dict) -> dict:
    """A worker's item as it travels (the DataLoader's ``collate_fn``, run in the worker): its
    tensors as numpy arrays, which are pickled through the worker's pipe. Tensors would instead be
    moved into fresh shared memory and their file descriptors passed over a socket, which costs
    about four times the CPU for a 64-sample item of token batches (2.4 against 0.6 ms on the
    2-core machine, both processes together: benchmarks/README.md, "data.py"); the pipe's copies
    are cheap at 140 kB an item. ``micro_batches`` makes them tensors again."""
    return {name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in item.items()}


def batch_loader(batches: torch.utils.data.IterableDataset, workers: int,
                 worker_init_fn: Callable[[int], None] | None = None) -> Iterator[dict]:
    """The DataLoader over ``batches`` (made with the same ``workers``), iterated: ``workers``
    worker processes (none: in this process), two items each in flight, each worker started with
    ``worker_init_fn``, its items handed over as arrays (``as_arrays``). ``micro_batches`` splits
    what it gives; its ``_workers`` are the worker processes."""
    return iter(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                            prefetch_factor=2 if workers else None, worker_init_fn=worker_init_fn,
                                            collate_fn=as_arrays))


def micro_batches(loader: Iterator[dict], batch_size: int) -> Iterator[dict]:
    """The micro-batches of ``loader``'s items (``GlobalBatches`` with a ``chunk``), in order: views
    of each item's tensors (arrays made tensors) and slices of its other values, ``batch_size``
    rows at a time. Bad data a worker found is raised as ``worker_errors`` raises it."""
    for item in worker_errors(loader):
        item = {name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
                for name, value in item.items()}
        first = next(iter(item.values()))
        for a in range(0, len(first), batch_size):
            yield {name: value[a:a + batch_size] for name, value in item.items()}


def worker_errors(loader: Iterator) -> Iterator:
    """``loader``'s items; bad data that a DataLoader worker found (an ``InputError``: a damaged
    index or shard) is raised here as the worker raised it, its one-line message alone.

    Why: the DataLoader raises a worker's exception again in the training process as the same
    class, but with the worker's whole traceback for its message ("Caught InputError in DataLoader
    worker process 0. Original Traceback ..."), which the CLI would print as the one line it
    prints for bad input. The traceback's last line holds the original message (torch keeps the
    text only, not the exception); a bug (any other class) keeps the traceback."""
    try:
        yield from loader
    except InputError as e:
        head = f"\n{type(e).__module__}.{type(e).__qualname__}: "
        text = str(e)
        if text.startswith(f"Caught {type(e).__name__} in DataLoader worker") and head in text:
            raise type(e)(text.rsplit(head, 1)[1].strip()) from None
        raise


def dead_worker_message(e: BaseException) -> str | None:
    """One line for the error a DataLoader raises in the training process when one of its workers
    died (the OOM killer's SIGKILL, a crash), saying what to do; None for any other error. The
    worker's death is no bug of the run (a traceback would only show where the training process
    happened to be when it noticed), and a rerun resumes from the last complete checkpoint."""
    text = str(e).strip()
    if not isinstance(e, RuntimeError) or not text.startswith("DataLoader worker (pid"):
        return None
    return (f"{text.rstrip('. ')}: a data loading process died (out of memory? see the kernel log, `dmesg`); "
            "run the same command again: training continues from its last complete checkpoint")


# ---------------------------------------------------------------------------------------------
# image shards: a stream per (rank, worker) slot

@dataclass(frozen=True)
class Stream:
    """Where a slot's samples come from and in which order (see the module doc)."""

    shards: tuple[str, ...]  # sorted shard paths
    counts: tuple[int, ...]  # samples in each shard
    seed: int
    shuffle_shards: int = 4  # shards read and permuted together
    resampled: bool = False

    def groups(self, slot: int, num_slots: int) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, group, shard indices) of slot ``slot``, forever."""
        if len(self.shards) < num_slots:
            raise InputError(f"{len(self.shards)} shards for {num_slots} readers (ranks x DataLoader "
                             f"workers): every reader needs a shard of its own; lower data.workers, use "
                             f"fewer ranks, or write smaller shards")
        if self.resampled:
            for g in itertools.count():
                rng = np.random.default_rng([self.seed, g, slot, 1])
                yield -1, g, list(rng.integers(len(self.shards), size=self.shuffle_shards))
        own = np.arange(slot, len(self.shards), num_slots)
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, epoch, slot, 0]).permutation(own)
            for g in range(0, len(order), self.shuffle_shards):
                yield epoch, g // self.shuffle_shards, list(order[g:g + self.shuffle_shards])

    def samples(self, slot: int, num_slots: int, start: int, read: Callable[[str], list[dict]],
                ) -> Iterator[tuple[dict, np.random.Generator]]:
        """(sample, its own RNG) from sample ``start`` of the slot's stream on."""
        if sum(self.counts) == 0:
            raise InputError("the shards hold no samples")
        for epoch, g, idx in self.groups(slot, num_slots):
            n = sum(self.counts[i] for i in idx)
            if start >= n:  # skipped without reading
                start -= n
                continue
            group = [s for i in idx for s in _checked(read(self.shards[i]), self.shards[i], self.counts[i])]
            order = np.random.default_rng([self.seed, epoch + 1, g, slot, 2]).permutation(len(group))
            for j in order[start:]:
                key_hash = zlib.crc32(group[j]["__key__"].encode())
                yield group[j], np.random.default_rng([self.seed, epoch + 1, g, key_hash, 3])
            start = 0


def _checked(samples: list[dict], shard: str, expected: int) -> list[dict]:
    if len(samples) != expected:
        raise InputError(f"{shard} holds {len(samples)} samples but its stats file says {expected}: the "
                         "shard changed after it was written; re-run the stage that made it")
    return samples


class Batches(torch.utils.data.IterableDataset):
    """Micro-batches of this rank's slots, from micro-batch ``start_batches`` of the rank's stream.

    ``make_batch(samples, rngs)`` turns ``batch_size`` samples into tensors; it runs in the
    DataLoader worker. Use with ``DataLoader(batch_size=None, num_workers=workers)`` and the same
    ``workers`` here.
    """

    def __init__(self, stream: Stream, make_batch: Callable, batch_size: int, rank: int, world_size: int,
                 workers: int, start_batches: int = 0, read: Callable[[str], list[dict]] = read_tar):
        self.stream, self.make_batch, self.batch_size = stream, make_batch, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)
        self.start_batches, self.read = start_batches, read
        stream.groups(0, self.world_size * self.workers).__next__()  # too few shards: fail here, not in a worker

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # Micro-batch i of the rank's stream comes from virtual worker i % workers. A DataLoader
        # takes its first batch from worker 0, so after ``start_batches`` worker w plays virtual
        # worker (w + start_batches) % workers, which had produced ``done`` batches by then.
        worker = ((info.id if info is not None else 0) + self.start_batches) % self.workers
        done = max(0, (self.start_batches - worker + self.workers - 1) // self.workers)
        slot = self.rank * self.workers + worker
        samples = self.stream.samples(slot, self.world_size * self.workers, done * self.batch_size, self.read)
        while True:
            chunk = list(itertools.islice(samples, self.batch_size))
            yield self.make_batch([s for s, _ in chunk], [r for _, r in chunk])


# ---------------------------------------------------------------------------------------------
# token samples -> BiART ids

class TokenBatch:
    """Token samples -> {"text": (B, text_len), "image": (B, image_len)} BiART ids, with
    BPE-dropout seeded per sample (picklable; the tokenizer loads once per worker). A sample is
    the index's (codes as an array, ``codes``) or a token shard's (``codes.npy`` bytes).

    The ids are as narrow as they fit: uint16 while every text id does (BiART's 58003 ids do),
    else int32: a DataLoader worker's batches travel through a pipe (``as_arrays``), and 2 bytes
    an id instead of 8 make that a quarter. ``build_sequence`` widens them to int64 where the
    sequence is put together.
    """

    def __init__(self, tokenizer_path: str, text_offset: int, text_len: int, image_len: int,
                 image_vocab: int, bpe_dropout: float):
        self.args = (tokenizer_path, text_offset, bpe_dropout)
        self.text_len, self.image_len, self.image_vocab = text_len, image_len, image_vocab
        self._tok = None

    def __call__(self, samples: list[dict], seeds: list[bytes]) -> dict[str, torch.Tensor]:
        if self._tok is None:
            from lverse.preprocessing.text_tokenizer import CaptionTokenizer
            path, offset, dropout = self.args
            self._tok = CaptionTokenizer(path, offset=offset, dropout=dropout)
        captions = [s.get("txt", b"") for s in samples]  # UTF-8: the tokenizer decodes what it must
        # Both in one buffer (one allocation, and one storage to move where a DataLoader's default
        # collate moves tensors into shared memory), as narrow as the ids fit.
        n, split = len(samples), len(samples) * self.text_len
        dtype = np.uint16 if self._tok.pad_id < 2**16 and self.image_vocab <= 2**16 else np.int32
        both = np.empty(split + n * self.image_len, dtype=dtype)
        self._stack_codes(samples, both[split:].reshape(n, self.image_len))
        self._tok.encode_into(both[:split], captions, self.text_len, training=True, seeds=seeds)
        both = torch.from_numpy(both)
        return {"text": both[:split].view(n, self.text_len), "image": both[split:].view(n, self.image_len)}

    def _stack_codes(self, samples: list[dict], out: np.ndarray) -> None:
        """The samples' codes written into ``out`` ((B, image_len)), checked at once; a bad sample
        is named by ``_codes``, the same one the per-sample check finds first."""
        import io
        rows = [s["codes"] if "codes" in s else np.load(io.BytesIO(s["codes.npy"]), allow_pickle=False)
                for s in samples]
        if all(r.shape == (self.image_len,) for r in rows):
            np.stack(rows, out=out, casting="unsafe")  # as assignment casts; a code out of range fails below
            if int(out.max(initial=0)) < self.image_vocab:
                return
        for s in samples:
            self._codes(s)
        raise AssertionError("unreachable: a sample failed the batch's check but not its own")

    def _codes(self, sample: dict) -> np.ndarray:
        import io
        codes = sample["codes"] if "codes" in sample else np.load(io.BytesIO(sample["codes.npy"]), allow_pickle=False)
        if (codes.shape != (self.image_len,) or int(codes.max(initial=0)) >= self.image_vocab
                or int(codes.min(initial=0)) < 0):
            raise InputError(f"sample {sample['__key__']}: {codes.shape[0]} codes from {int(codes.min(initial=0))} "
                             f"up to {int(codes.max(initial=0))}, but the model takes {self.image_len} codes from 0 "
                             f"below {self.image_vocab}; the token shards and model.image_len / image_vocab disagree "
                             "(or a shard is damaged)")
        return codes

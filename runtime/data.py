"""Training data: webdataset shards streamed to every rank and worker, resumable to the sample.

Each (rank, DataLoader worker) pair is a *slot*; slot s of S owns shards ``s, s+S, s+2S, ...`` of
the sorted shard list, so no sample is seen twice in an epoch and a clear error is raised when
there are fewer shards than slots. A slot's stream is infinite (training is counted in steps) and
a pure function of (seed, slot):

- **epoch** mode: epoch e visits the slot's shards in an order drawn from (seed, e, slot);
- **resampled** mode: group g draws its shards with replacement from all shards, from (seed, g, slot).

Shards are read ``shuffle_shards`` at a time (a *group*, the shuffle buffer: every sample of the
group in memory) and the group's samples are permuted from (seed, epoch, group, slot). Per-sample
randomness (BPE-dropout, random crops) is seeded from (seed, epoch, group, key).

Why not webdataset's own ``shuffle``/``ResampledShards``: their RNG advances with every sample,
so resuming at sample n means replaying n samples. Here the sample counts every shard's stats file
records make a position addressable: resuming skips whole groups without reading them and reads
only the group it lands in. The DataLoader takes micro-batches from its workers in turn, so
micro-batch i came from worker ``i % workers``: the number of micro-batches consumed is the whole
data position. Tars are read with webdataset's tar expander.
"""

from __future__ import annotations

import itertools
import logging
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lverse.core.errors import InputError
from lverse.core.shards import read_tar

log = logging.getLogger(__name__)


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


def ignore_signal(name: str, worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: SLURM signals every process of a job step, DataLoader workers
    included, and a worker killed by the stop signal ends training before it can checkpoint; with
    ``functools.partial(ignore_signal, "SIGUSR1")`` only the training process handles it."""
    import signal
    signal.signal(getattr(signal, name), signal.SIG_IGN)


class TokenBatch:
    """Token-shard samples -> {"text": (B, text_len), "image": (B, image_len)} BiART ids, with
    BPE-dropout seeded per sample (picklable; the tokenizer loads once per worker)."""

    def __init__(self, tokenizer_path: str, text_offset: int, text_len: int, image_len: int,
                 image_vocab: int, bpe_dropout: float):
        self.args = (tokenizer_path, text_offset, bpe_dropout)
        self.text_len, self.image_len, self.image_vocab = text_len, image_len, image_vocab
        self._tok = None

    def __call__(self, samples: list[dict], rngs: list[np.random.Generator]) -> dict[str, torch.Tensor]:
        if self._tok is None:
            from lverse.preprocessing.text_tokenizer import CaptionTokenizer
            path, offset, dropout = self.args
            self._tok = CaptionTokenizer(path, offset=offset, dropout=dropout)
        codes = np.stack([self._codes(s) for s in samples])
        captions = [s.get("txt", b"").decode("utf-8", "replace") for s in samples]
        text = self._tok.encode(captions, self.text_len, training=True, rngs=rngs)
        return {"text": text, "image": torch.from_numpy(codes.astype(np.int64))}

    def _codes(self, sample: dict) -> np.ndarray:
        import io
        codes = np.load(io.BytesIO(sample["codes.npy"]), allow_pickle=False)
        if codes.shape != (self.image_len,) or int(codes.max(initial=0)) >= self.image_vocab:
            raise InputError(f"sample {sample['__key__']}: {codes.shape[0]} codes up to {int(codes.max())}, "
                             f"but the model takes {self.image_len} codes below {self.image_vocab}; the "
                             "token shards and model.image_len / image_vocab disagree")
        return codes

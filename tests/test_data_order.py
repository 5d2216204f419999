"""BiART's global data order (runtime/data.py) over the token index (runtime/token_index.py).

The token shards are real: ``run_encode`` output of tests/test_train.py's ``data`` fixture (4
shards of 16 samples). The order is checked at the data layer, from the loaders themselves
(``GlobalBatches``, and ``data_loader`` of pipeline/train.py on a planned run of each rank), and
once through real training: a 2-rank run resumed on 1 rank logs the losses of one that was not.
"""

import collections
import copy
import glob
import hashlib
import io
import json
import os
import re
import shutil
import struct

import ftfy
import numpy as np
import pytest
import sentencepiece as spm
import torch

from lverse.cli import main
from lverse.core.errors import InputError
from lverse.core.formats import TOKEN_INDEX_FORMAT
from lverse.core.shards import file_sha256, iter_samples
from lverse.pipeline.configs import DataConfig, EncodeConfig, TrainConfig
from lverse.pipeline.encode import run_encode
from lverse.pipeline.train import data_loader, plan_run
from lverse.preprocessing import text_tokenizer
from lverse.preprocessing.text_tokenizer import CaptionTokenizer, normalize_caption
from lverse.runtime.data import GlobalBatches, GlobalOrder, TokenBatch, micro_batches, sample_seed
from lverse.runtime.token_index import TokenIndex, TokenSamples, index_path, open_samples
from lverse.runtime.token_index_build import build_index, ensure_index
from lverse.runtime.trainer import Checkpoint, Process

from .test_train import PER_SHARD, SHARDS, losses, metrics, run_job, train_config

N = SHARDS * PER_SHARD


def shards_of(folder):
    return sorted(glob.glob(os.path.join(folder, "*.tar")))


@pytest.fixture(scope="module")
def samples(data):  # noqa: F811
    """The fixture's shards through their index (built here when missing, as training does)."""
    return ensure_index(shards_of(data["tokens"]), file_sha256(data["vae"]))


@pytest.fixture
def tokens(data, tmp_path):  # noqa: F811
    """A copy of the token shards (mtimes kept, no index) that a test may change."""
    folder = tmp_path / "tokens"
    shutil.copytree(data["tokens"], folder, ignore=shutil.ignore_patterns("_index", ".*"))
    return str(folder)


def keys_of(samples, seeds):
    return [s["__key__"] for s in samples]


# --- the index --------------------------------------------------------------------------------

def test_the_index_holds_every_sample_of_the_shards(tokens, capsys):
    summary = build_index(tokens, progress=False, workers=2)  # shards read by 2 processes
    index = TokenIndex(os.path.join(tokens, "_index"))
    assert summary["samples"] == len(index) == N and index.meta["image_len"] == 64
    assert os.path.getsize(os.path.join(tokens, "_index", "codes.u16")) == 2 * 64 * N
    row = 0
    for shard in shards_of(tokens):
        for sample in iter_samples(shard):
            got = index.sample(row)
            assert got["__key__"] == sample["__key__"] and got["txt"] == sample["txt"]
            assert np.array_equal(got["codes"], np.load(io.BytesIO(sample["codes.npy"])))
            row += 1
    # a subset of the folder's shards (data.shards as a glob or range) is read from the same index
    subset = TokenSamples(index, shards_of(tokens)[1::2])
    expected = [s["__key__"] for shard in shards_of(tokens)[1::2] for s in iter_samples(shard)]
    assert [subset[i]["__key__"] for i in range(len(subset))] == expected
    # the command leaves an index that matches the shards as it is
    assert main(["index", "--tokens", tokens, "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True


def test_a_stale_index_is_refused_until_it_is_rebuilt(tokens, data, capsys, tmp_path):  # noqa: F811
    vae_hash, named = file_sha256(data["vae"]), shards_of(tokens)
    ensure_index(named, vae_hash)  # none there: built
    os.remove(os.path.join(tokens, "00001_stats.json"))  # shard 1 encoded again
    run_encode(EncodeConfig(shards=os.path.join(data["raw"], "00001.tar"), vae=data["vae"], output=tokens, workers=0))
    with pytest.raises(InputError, match=r"no longer matches the shards: 00001.* `lverse index --tokens "):
        ensure_index(named, vae_hash)  # training builds only a missing index; a stale one is refused
    assert main(["index", "--tokens", tokens, "--quiet"]) == 0
    assert "up_to_date" not in json.loads(capsys.readouterr().out)
    assert len(ensure_index(named, vae_hash)) == N
    shutil.copy(os.path.join(tokens, "00000.tar"), os.path.join(tokens, "00004.tar"))  # a shard added
    shutil.copy(os.path.join(tokens, "00000_stats.json"), os.path.join(tokens, "00004_stats.json"))
    with pytest.raises(InputError, match="00004.tar is not in it"):
        open_samples(shards_of(tokens), vae_hash)
    assert len(open_samples(named, vae_hash)) == N  # the shards it holds unchanged are still served
    with pytest.raises(InputError, match="of another AugVAE"):
        open_samples(named, "0" * 64)
    build_index(tokens, progress=False)
    assert len(open_samples(shards_of(tokens), vae_hash)) == N + PER_SHARD
    elsewhere = str(tmp_path / "index")  # an index out of its tokens folder: its errors name --index-dir
    build_index(tokens, progress=False, index_dir=elsewhere)
    os.truncate(os.path.join(index_path(tokens, elsewhere), "codes.u16"), 0)
    with pytest.raises(InputError, match=re.escape(f"`lverse index --tokens {tokens} --index-dir {elsewhere}`")):
        open_samples(shards_of(tokens), vae_hash, index_dir=elsewhere)


def test_an_index_of_another_format_is_refused_naming_the_command_that_rebuilds_it(tokens, data, capsys):  # noqa: F811
    """One format version: an index of another version, or whose meta.json lacks a field, is
    refused, by training too (it builds only a missing index), with the command that rebuilds it."""
    vae_hash, named = file_sha256(data["vae"]), shards_of(tokens)
    build_index(tokens, progress=False)
    meta_path = os.path.join(tokens, "_index", "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    other = TOKEN_INDEX_FORMAT + 1
    for changed, why in (({**meta, "version": other}, f"is of version {other}, this lverse reads {TOKEN_INDEX_FORMAT}"),
                         ({k: v for k, v in meta.items() if k != "crops"}, "has no crops in its meta.json")):
        with open(meta_path, "w") as f:
            json.dump(changed, f)
        refusal = re.escape(f"{why}: rebuild it with `lverse index --tokens {tokens}`")
        with pytest.raises(InputError, match=refusal):
            open_samples(named, vae_hash)
        with pytest.raises(InputError, match=refusal):
            ensure_index(named, vae_hash)
        assert main(["index", "--tokens", tokens, "--quiet"]) == 0  # the command named rebuilds it
        assert "up_to_date" not in json.loads(capsys.readouterr().out)
        assert len(open_samples(named, vae_hash)) == N


# --- the order --------------------------------------------------------------------------------

def global_batches(samples, world, workers, steps, resampled=False, chunk=1):
    """Micro-steps 0..steps-1 of ``world`` ranks with W*B = 8, each as one list of keys (rank 0's
    slice first); the workers hand over ``chunk`` micro-batches at once."""
    per_rank = []
    for rank in range(world):
        ds = GlobalBatches(samples, GlobalOrder(len(samples), 0, resampled), keys_of_batch, 8 // world, rank, world,
                           workers, chunk=chunk)
        it = micro_batches(iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)), 8 // world)
        per_rank.append([next(it)["keys"] for _ in range(steps)])
    return [[key for rank in range(world) for key in per_rank[rank][g]] for g in range(steps)]


def keys_of_batch(samples, seeds):
    return {"keys": [s["__key__"] for s in samples], "n": torch.arange(len(samples))}


@pytest.mark.parametrize("resampled", [False, True], ids=["epochs", "resampled"])
def test_global_batch_g_holds_the_same_samples_whatever_the_ranks_and_workers(samples, resampled):
    """... and however many micro-batches a worker hands over at once."""
    reference = global_batches(samples, 1, 0, 12, resampled)  # 96 samples: into the second epoch
    for world in (1, 2, 4):
        for workers in (0, 1, 2):
            assert global_batches(samples, world, workers, 12, resampled) == reference, (world, workers)
    for world, workers, chunk in ((1, 2, 3), (2, 2, 5), (4, 1, 2)):
        assert global_batches(samples, world, workers, 12, resampled, chunk) == reference, (world, workers, chunk)


def test_an_epoch_sees_every_sample_once(samples):
    every = sorted(samples[i]["__key__"] for i in range(N))
    keys = [samples[i]["__key__"] for _, i in GlobalOrder(N, 0).at(range(2 * N))]
    assert sorted(keys[:N]) == sorted(keys[N:]) == every
    assert keys[:N] != keys[N:]  # each epoch its own permutation
    assert [k for _, k in GlobalOrder(N, 1).at(range(N))] != [k for _, k in GlobalOrder(N, 0).at(range(N))]
    drawn = GlobalOrder(N, 0, resampled=True).epoch(0)  # resampled: N draws with replacement
    assert len(drawn) == N and len(set(drawn.tolist())) < N


def test_more_ranks_times_workers_than_shards(samples):
    """8 ranks x 2 workers read 4 shards: one epoch (4 micro-steps of 8 x 2) is every sample once."""
    seen = []
    for rank in range(8):
        ds = GlobalBatches(samples, GlobalOrder(N, 0), keys_of, 2, rank, 8, 2)
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
        seen += [key for _ in range(4) for key in next(it)]
    assert sorted(seen) == sorted(samples[i]["__key__"] for i in range(N))


class KeyedTokenBatch(TokenBatch):
    """TokenBatch that also says which samples it made the batch of."""

    def __call__(self, samples, seeds):
        return {**super().__call__(samples, seeds), "keys": [s["__key__"] for s in samples]}


def consume(paths, world, micro_batch, start, end, resume=None, grad_accum=1, workers=2):
    """What ``world`` ranks' data_loader gives for steps start..end-1, as one list of
    (key, direction, caption ids) in the order of the global batches, and the checkpoint its run
    would write at ``end`` (its data key and samples consumed, as save_checkpoint records them)."""
    from lverse.pipeline.train import samples_before
    cfg = TrainConfig(micro_batch_size=micro_batch, grad_accum=grad_accum, deepspeed="zero2_fp32",
                      data=DataConfig(shards=paths["tokens"], tokenizer=paths["tokenizer"], vae=paths["vae"],
                                      workers=workers))
    cfg.model.overrides = {"text_len": 24}
    runs = [plan_run(cfg, Process(rank, world, rank, torch.device("cpu"))) for rank in range(world)]
    loaders = [data_loader(run, ensure_index(run.shards, run.provenance["vae_sha256"]), start, resume) for run in runs]
    consumed = []
    for step in range(start, end):
        for _ in range(grad_accum):
            for loader in loaders:
                batch = next(loader)
                consumed += [(key, step % 2, tuple(text.tolist())) for key, text in zip(batch["keys"], batch["text"])]
    meta = {"data": copy.deepcopy(runs[0].data_key), "samples": samples_before(runs[0], end), "step": end}
    return consumed, Checkpoint(end, "", meta)


def test_a_run_resumed_2_1_4_ranks_consumes_what_an_uninterrupted_one_does(data, samples, monkeypatch):  # noqa: F811
    """(key, direction, caption pieces with BPE-dropout) of every sample consumed, through
    data_loader: 2 ranks to step 4, 1 rank (micro-batch doubled) to 8, 4 ranks (halved) to 12,
    against 2 ranks throughout; then with other global batches: the samples continue exactly."""
    import lverse.pipeline.train
    monkeypatch.setattr(lverse.pipeline.train, "TokenBatch", KeyedTokenBatch)  # what data_loader makes batches with
    full, _ = consume(data, 2, 4, 0, 12)
    assert len(full) == 96 and len({k for k, _, _ in full[:N]}) == N
    part, checkpoint = consume(data, 2, 4, 0, 4)
    more, checkpoint = consume(data, 1, 8, 4, 8, checkpoint)
    rest, _ = consume(data, 4, 2, 8, 12, checkpoint, workers=0)
    assert part + more + rest == full
    # global batch 8 -> 10 (1 rank, 5 x 2 micro-steps) -> 8: each sample follows the last consumed
    part, checkpoint = consume(data, 2, 4, 0, 3)
    more, checkpoint = consume(data, 1, 5, 3, 6, checkpoint, grad_accum=2)
    assert checkpoint.meta["data"]["origin"] == [3, 24]
    rest, _ = consume(data, 4, 2, 6, 8, checkpoint, workers=1)
    assert [(k, t) for k, _, t in part + more + rest] == [(k, t) for k, _, t in full[:24 + 30 + 16]]


# --- the batches, against a straightforward reference -------------------------------------------
# The loader reads a batch of samples at once, draws a caption's dropout draws in one hash call,
# keeps each word's plain BPE and looks up whether its draws drop any of its merges, and skips
# ftfy for plain ASCII (benchmarks/data.py); these tests pin that it makes, bit for bit, the
# batches of the plain per-sample path written out below.

def reference_draws(seed: int, epoch: int, key: str, count: int = 1 << 16) -> np.ndarray:
    """A sample's dropout draws: 16-bit little-endian words of SHAKE-128 of a tag, the seed and
    epoch as 8-byte little-endian integers, and the key."""
    material = b"lverse-bpe-dropout\0" + struct.pack("<qQ", seed, epoch) + key.encode()
    return np.frombuffer(hashlib.shake_128(material).digest(2 * count), dtype="<u2")


def reference_pieces(sp, text: str, dropout: float, draws, by_word: bool = True) -> list[int]:
    """A caption's piece ids: ftfy and whitespace, then BPE from characters word by word (a word
    starts at each \u2581), where every step looks at the mergeable pairs from the best score down
    (the leftmost of equal scores), takes one draw for each and merges the first whose draw is
    not below ``dropout * 65536``; a step that merges nothing ends the word."""
    text = re.sub(r"\s+", " ", ftfy.fix_text(text)).strip()
    piece_ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                 if not (sp.is_control(i) or sp.is_unknown(i))}
    score = {piece: sp.get_score(i) for piece, i in piece_ids.items()}
    words = []
    for c in "".join(sp.encode(text, out_type=str)):
        if words and not (by_word and c == "\u2581"):
            words[-1] += c
        else:
            words.append(c)
    draws, symbols = iter(draws), []
    for word in words:
        word = list(word)
        while True:
            pairs = sorted((-score[word[i] + word[i + 1]], i) for i in range(len(word) - 1)
                           if word[i] + word[i + 1] in score)
            kept = next((i for _, i in pairs if next(draws) >= round(dropout * 65536)), None)
            if kept is None:
                break
            word[kept:kept + 2] = [word[kept] + word[kept + 1]]
        symbols += word
    ids = []
    for sym in symbols:  # a run of unknown characters is one unknown piece
        pid = piece_ids.get(sym, sp.unk_id())
        if not (pid == sp.unk_id() and ids and ids[-1] == sp.unk_id()):
            ids.append(pid)
    return ids


def reference_batch(samples, seed, resampled, positions, tokenizer, text_len, offset, dropout=0.1):
    """The batch of ``positions``, one sample at a time: its epoch's order, its row of the index,
    its own draws from (seed, epoch, its key), its pieces."""
    tok = CaptionTokenizer(tokenizer, offset=offset)
    text = torch.full((len(positions), text_len), offset + tok.vocab_size, dtype=torch.long)
    image = []
    for row, p in enumerate(positions):
        epoch, i = divmod(p, len(samples))
        sample = samples.index.sample(samples.row(int(GlobalOrder(len(samples), seed, resampled).epoch(epoch)[i])))
        draws = reference_draws(seed, epoch, sample["__key__"])
        ids = reference_pieces(tok.sp, sample["txt"].decode(), dropout, draws)[:text_len]
        text[row, :len(ids)] = torch.tensor(ids, dtype=torch.long) + offset
        image.append(torch.from_numpy(sample["codes"].astype(np.int64)))
    return {"text": text, "image": torch.stack(image)}


def assert_same_batch(got, expected):
    assert sorted(got) == sorted(expected)
    for name in expected:  # handed over as narrow as the ids fit (TokenBatch): uint16 for this vocabulary
        assert got[name].dtype == torch.uint16 and got[name].shape == expected[name].shape, name
        assert torch.equal(got[name].long(), expected[name]), name


@pytest.mark.parametrize("resampled", [False, True], ids=["epochs", "resampled"])
def test_the_batches_are_those_of_the_per_sample_path(data, samples, resampled):  # noqa: F811
    """Rank 1 of 2 from position 40 (a resumed run), micro-batch 6, 16 micro-steps: 192 positions,
    into the third epoch of 64 samples; then the same through a DataLoader with 2 workers."""
    text_len, offset, seed, start = 24, 512, 5, 40
    make_batch = TokenBatch(data["tokenizer"], offset, text_len, 64, 512, 0.1)
    ds = GlobalBatches(samples, GlobalOrder(N, seed, resampled), make_batch, 6, 1, 2, 0, start)
    for k, batch in zip(range(16), ds):
        expected = reference_batch(samples, seed, resampled, ds.positions(k), data["tokenizer"], text_len, offset)
        assert_same_batch(batch, expected)
    ds = GlobalBatches(samples, GlobalOrder(N, seed, resampled), make_batch, 6, 1, 2, 2, start)
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    for k in range(4):
        assert_same_batch(next(loader), reference_batch(samples, seed, resampled, ds.positions(k), data["tokenizer"],
                                                        text_len, offset))


def test_ids_wider_than_16_bits_are_handed_over_as_int32(data, samples):  # noqa: F811
    picked = [samples[i] for i in range(6)]
    seeds = [sample_seed(5, 0, s["__key__"]) for s in picked]
    offset = 2**16  # text ids from 65536 on: they do not fit uint16
    wide = TokenBatch(data["tokenizer"], offset, 24, 64, 512, 0.1)(picked, seeds)
    narrow = TokenBatch(data["tokenizer"], 512, 24, 64, 512, 0.1)(picked, seeds)
    assert wide["text"].dtype == wide["image"].dtype == torch.int32 and int(wide["text"].max()) >= offset
    assert torch.equal(wide["text"].long() - offset + 512, narrow["text"].long())
    assert torch.equal(wide["image"].long(), narrow["image"].long())


def test_codes_out_of_range_are_refused_naming_the_sample(data, samples):  # noqa: F811
    """Codes stacked into the narrow batch buffer are checked there: one at the vocabulary's size,
    or a negative one from a damaged token shard (which the cast into uint16 would wrap), is a
    clear error naming the sample, not a batch of wrong ids."""
    make_batch = TokenBatch(data["tokenizer"], 512, 24, 64, 512, 0.1)
    good = [samples[i] for i in range(3)]
    seeds = [sample_seed(5, 0, s["__key__"]) for s in good]
    for bad_code in (512, -1):
        bad = {**good[1], "codes": good[1]["codes"].astype(np.int64)}
        bad["codes"][7] = bad_code
        with pytest.raises(InputError, match=f"sample {bad['__key__']}: 64 codes from"):
            make_batch([good[0], bad, good[2]], seeds)


@pytest.fixture(scope="module")
def made_up(tmp_path_factory):
    """Captions with many merges: a tokenizer of 300 pieces over made-up words."""
    rng = np.random.default_rng(0)
    syllables = ["ka", "lo", "mi", "ne", "st", "ra", "ou", "th", "e", "an", "ch", "ing"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(200)]
    captions = [" ".join(rng.choice(words, size=rng.integers(3, 15))) for _ in range(400)]
    folder = tmp_path_factory.mktemp("made_up")
    return captions, CaptionTokenizer.fit(captions, str(folder / "tok"), vocab_size=300, offset=512), folder


def test_bpe_dropout_is_that_of_the_plain_loop(made_up):
    """Unknown and non-ASCII characters, HTML entities, control characters and long words that
    need more draws than a SHAKE-128 block holds: the same pieces from the same seed as the plain
    loop, for the cached plain segmentations too (each caption twice), a caption at a time
    (``pieces``) and a batch at a time (``encode_into``, the C path for printable ASCII, the
    others one by one; as str and as UTF-8 bytes, truncated to 40 ids); and a model whose pieces
    span words (no split by whitespace) merges the whole caption as one word."""
    captions, tok, folder = made_up
    long_word = "kalominestraouthe" * 12
    tricky = ["Ünïcode   café, 100% — “quotes” 東京", "fish &amp; chips", "cafÃ©", "a\tb\nc\r\nd", "\x00x\x7f",
              "ｆｕｌｌ ｗｉｄｔｈ ﬁne", "", " ", "k", "東京東京 東", "x" * 200, " ".join(captions[:25]), long_word,
              "  two  spaces ", "~!@#$%^*()_+{}|:<>?`-=[]\\;',./\""]
    texts = captions[:150] + tricky
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_prefix=str(folder / "whole"),
                                   model_type="bpe", vocab_size=300, split_by_whitespace=False, unk_id=0,
                                   bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2)
    whole = CaptionTokenizer(str(folder / "whole.model"), offset=512)
    assert not whole._word_split and tok._word_split and tok._ascii_words
    length = 40
    for dropout in (0.1, 0.5, 0.9):
        for t in (tok, whole):
            t.dropout = dropout
            # seeds of 7 to 400 bytes: SHAKE-128 absorbs 168 a block
            seeds = [b"seed %d " % (j % len(texts)) * (1 + j % len(texts) % 50) for j in range(2 * len(texts))]
            expected = [reference_pieces(t.sp, caption, dropout, reference_draws_of(seed), t is tok)
                        for caption, seed in zip(texts * 2, seeds)]
            for caption, seed, ids in zip(texts * 2, seeds, expected):
                assert t.pieces(caption, True, seed) == ids, caption
            rows = np.full((len(expected), length), t.vocab_size, dtype=np.int64)
            for row, ids in zip(rows, expected):
                row[:len(ids[:length])] = ids[:length]
            for batch in (texts * 2, [c.encode() for c in texts * 2]):
                for dtype in (np.uint16, np.int64):
                    out = np.zeros(len(batch) * length, dtype)
                    t.encode_into(out, batch, length, training=True, seeds=seeds)
                    assert np.array_equal(out.reshape(-1, length).astype(np.int64) - t.offset, rows), (dropout, dtype)
    # The long word takes more draws than a block of SHAKE-128 (168 bytes, 84 draws) holds, and
    # more than three, so its pieces above came from a stream squeezed further.
    drawn = []
    draws = reference_draws_of(b"any seed")
    reference_pieces(tok.sp, long_word, 0.9, (drawn.append(d) or d for d in draws))
    assert len(drawn) > 3 * 84


def test_a_full_word_cache_starts_again_with_the_same_pieces(made_up, monkeypatch):
    """The C side keeps words' plain BPE up to a number of words, then drops them all and starts
    again: a cache of 3 words gives the pieces of one that never fills."""
    captions, tok, folder = made_up
    tok.dropout = 0.3
    assert tok._merger  # made with the full size, before the size is patched
    monkeypatch.setattr(text_tokenizer, "_PLAIN_WORDS", 3)
    small = CaptionTokenizer(tok.model_path, offset=512, dropout=0.3)
    seeds = [b"%d" % j for j in range(len(captions))]
    out = {t: np.zeros(len(captions) * 30, np.int64) for t in (tok, small)}
    for t in (tok, small):
        t.encode_into(out[t], captions, 30, training=True, seeds=seeds)
    assert 0 < small._merger.words <= 3 < tok._merger.words
    assert np.array_equal(out[small], out[tok])
    assert [small.pieces(c, True, s) for c, s in zip(captions, seeds)] == [tok.pieces(c, True, s)
                                                                        for c, s in zip(captions, seeds)]


def reference_draws_of(seed: bytes, count: int = 1 << 16) -> np.ndarray:
    return np.frombuffer(hashlib.shake_128(seed).digest(2 * count), dtype="<u2")


def test_bpe_dropout_looking_only_at_the_pairs_it_needs_drops_as_drawing_for_every_pair(made_up):
    """One draw per pair looked at gives the segmentations of Provilkov et al.'s rule (every
    adjacent pair drawn at every step, the best kept pair merged) with the same probabilities:
    20,000 segmentations of a long word each way, total variation below 0.04 (about 0.015 by
    chance alone at this count)."""
    captions, tok, _ = made_up
    word = max((w for c in captions for w in c.split()), key=len)
    tok.dropout = 0.2
    chars = tok.sp.normalize(word)
    score = {piece: tok._scores[i] for piece, i in tok._piece_ids.items()}
    rng = np.random.default_rng(0)
    theirs = collections.Counter()
    for _ in range(20_000):
        symbols = list(chars)
        while len(symbols) > 1:
            kept = rng.random(len(symbols) - 1) >= tok.dropout
            best = max(((score[symbols[i] + symbols[i + 1]], -i) for i in range(len(symbols) - 1)
                        if kept[i] and symbols[i] + symbols[i + 1] in score), default=None)
            if best is None:
                break
            i = -best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        theirs[tuple(symbols)] += 1
    mine = collections.Counter(tuple(tok.sp.id_to_piece(p) for p in tok.pieces(word, True, b"%d" % j))
                               for j in range(20_000))
    assert len(theirs) > 5  # the word has many segmentations
    assert sum(abs(mine[k] - theirs[k]) for k in mine.keys() | theirs.keys()) / 2 / 20_000 < 0.04


def test_ftfy_leaves_plain_ascii_alone():
    """ftfy leaves printable ASCII without ``&`` alone (normalize_caption skips it there)."""
    rng = np.random.default_rng(0)
    printable = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"]
    texts = ["".join(rng.choice(printable, size=rng.integers(0, 80))) for _ in range(2000)]
    texts += printable + [a + b for a in printable for b in printable]
    for text in texts:
        assert ftfy.fix_text(text) == text
        assert normalize_caption(text) == re.sub(r"\s+", " ", text).strip()


# --- through training -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_two_rank_run_resumed_on_one_rank_logs_the_same_losses(data, tmp_path):  # noqa: F811
    """Universal checkpoint, lr 3e-3: a 2-rank run checkpointed at step 4 and resumed on 1 rank
    with the micro-batch doubled (the same global batch, so the same samples per step) logs the
    losses of the 2-rank run that went on, within 1e-4 (measured: 1e-6). So does the same
    checkpoint resumed on 1 rank with the config unchanged: lverse keeps the checkpoint's global
    batch by itself (two micro-steps of 4, said in the log), within 1e-5 (measured: equal). That
    needs the Adam moments carried over: with them zeroed after the load the losses of steps 6-8
    differ by up to 1.8 (measured). What would differ for other reasons is held equal: fp32 (bf16
    rounds the two layouts' sums differently); no dropout (its masks are drawn per rank); text_len
    12, shorter than every caption, so no caption is padded: a rank's loss is the mean over its own
    text tokens, and with padding the mean of two ranks' means is not the mean over all 8 samples
    (1.9e-3 apart on this data with text_len 24), a property of the loss, not of the data order."""
    over = dict(steps=8, checkpoint_every=4, export=False, deepspeed="zero2_fp32",
                model={"preset": "debug", "overrides": {"text_len": 12, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
                                                         "attn_pdrop": 0.0}},
                optim={"schedule": "constant"})  # the lr of a step does not depend on cfg.steps
    run_job(2, "train", "--config", train_config(tmp_path / "full.yaml", data, tmp_path / "full", **over))
    run_job(2, "train", "--config", train_config(tmp_path / "a.yaml", data, tmp_path / "part", **{**over, "steps": 4}))
    shutil.copytree(tmp_path / "part", tmp_path / "kept")
    out = run_job(1, "train", "--config", train_config(tmp_path / "b.yaml", data, tmp_path / "part", **over,
                                                       micro_batch_size=8))
    assert "converting to a universal checkpoint" in out and "resumed from" in out
    out = run_job(1, "train", "--config", train_config(tmp_path / "c.yaml", data, tmp_path / "kept", **over))
    assert "global batch 8 of checkpoint" in out and "kept on 1 ranks: micro_batch_size 4 x grad_accum 2 (the " \
        "config's 4 x 1 on 2 ranks)" in out, out[-3000:]
    marker = json.load(open(tmp_path / "kept" / "checkpoints" / "step_00000008" / "lverse.json"))
    assert (marker["world_size"], marker["batch"], marker["data"]["global_batch"]) == (1, [4, 1], 8)
    full = metrics(tmp_path / "full")
    for run, tolerance in (("part", 1e-4), ("kept", 1e-5)):
        resumed = metrics(tmp_path / run)
        assert sorted(full) == sorted(resumed) == list(range(1, 9))
        worst = 0.0
        for step in range(5, 9):
            a, b = losses(full[step][0]), losses(resumed[step][-1])
            assert a.keys() == b.keys()
            worst = max(worst, *(abs(a[k] - b[k]) for k in a))
        print(f"{run}: largest loss difference after the resume: {worst:.2e}")
        assert worst <= tolerance, run

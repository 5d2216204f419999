"""Offline batch captioning: real shards, a debug BiART, the debug AugVAE, a tiny random CLIP."""

import glob
import hashlib
import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lverse.core.errors import InputError
from lverse.core.formats import TOKEN_SHARD_FORMAT
from lverse.core.shards import iter_samples, read_tar
from lverse.model import AugVAE, BiART, save_model
from lverse.model.augvae import PRESETS as VAE_PRESETS
from lverse.model.biart import PRESETS, BiARTConfig
from lverse.model.checkpoint import provenance_of
from lverse.model.clip import ClipScorer
from lverse.pipeline.caption import run_caption
from lverse.pipeline.configs import CaptionConfig
from lverse.preprocessing.text_tokenizer import CaptionTokenizer, truncate_caption

from .test_train import PER_SHARD, SHARDS


@pytest.fixture(scope="module")
def others(data, tmp_path_factory):  # noqa: F811
    """An AugVAE of the same shape and a tokenizer of the same size as the BiART's, but other files."""
    root = tmp_path_factory.mktemp("others")
    torch.manual_seed(1)
    save_model(AugVAE(VAE_PRESETS["debug-sl"]), str(root / "vae.safetensors"))
    captions = [" ".join(reversed(s["txt"].decode().split())) for s in iter_samples(os.path.join(data["raw"],
                                                                                                 "00000.tar"))]
    CaptionTokenizer.fit(captions * 4, str(root / "tok"), vocab_size=CaptionTokenizer(data["tokenizer"]).vocab_size,
                         offset=512)
    return {"vae": str(root / "vae.safetensors"), "tokenizer": str(root / "tok.model")}


def config(data, biart, output, **over):  # noqa: F811
    """Captioning in this process (workers 0): what is written does not depend on where; the
    worker processes are tested where they matter (test_stop, test_multinode, the Ray tests)."""
    base = dict(shards=data["tokens"], checkpoint=biart, vae=data["vae"], tokenizer=data["tokenizer"],
                output=str(output), candidates=4, max_tokens=8, batch_size=3, clip="lverse-tiny", workers=0)
    return CaptionConfig(**{**base, **over})


def test_cut_at_the_first_full_stop():
    assert truncate_caption("a red circle. on blue. x") == "a red circle."
    assert truncate_caption(" no stop here ") == "no stop here"


def test_captions_every_image_once_and_a_rerun_writes_nothing(data, biart, tmp_path):  # noqa: F811
    summary = run_caption(config(data, biart, tmp_path / "out", keep_candidates=True))
    assert (summary["shards"], summary["done"], summary["images"]) == (SHARDS, SHARDS, SHARDS * PER_SHARD)
    files = sorted(glob.glob(str(tmp_path / "out" / "*.parquet")))
    assert [os.path.basename(f) for f in files] == [f"{i:05d}.parquet" for i in range(SHARDS)]
    for i, f in enumerate(files):
        table = pq.read_table(f).to_pydict()
        keys = [s["__key__"] for s in read_tar(os.path.join(data["tokens"], f"{i:05d}.tar"))]
        assert table["key"] == keys  # one row per image, in shard order
        # each caption is its whole one cut after the first full stop
        assert all(isinstance(w, str) and truncate_caption(w) == c and w.startswith(c)
                   for c, w in zip(table["caption"], table["caption_whole"]))
        assert all(len(c) == 4 for c in table["candidates"])
    mtimes = {f: os.stat(f).st_mtime_ns for f in files}
    again = run_caption(config(data, biart, tmp_path / "out", keep_candidates=True))
    assert (again["done"], again["skipped"], again["images"]) == (0, SHARDS, 0)
    assert mtimes == {f: os.stat(f).st_mtime_ns for f in files}


def test_reranking_keeps_the_candidate_clip_scores_highest(data, biart, tmp_path):  # noqa: F811
    run_caption(config(data, biart, tmp_path / "out", keep_candidates=True, shards=os.path.join(data["raw"],
                                                                                                 "00000.tar")))
    table = pq.read_table(tmp_path / "out" / "00000.parquet").to_pydict()
    for caption, score, cands, scores in zip(table["caption"], table["clip_score"], table["candidates"],
                                             table["candidate_scores"]):
        assert caption == cands[int(np.argmax(scores))] and score == max(scores)
    # The scores are CLIP's: recomputed here for the first image and its candidates.
    import io

    first = next(iter_samples(os.path.join(data["raw"], "00000.tar")))
    image = Image.open(io.BytesIO(first["jpg"])).convert("RGB")
    clip = ClipScorer("lverse-tiny")
    expected = clip.scores([image] * 4, table["candidates"][0])
    np.testing.assert_allclose(table["candidate_scores"][0], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert len(set(table["candidates"][0])) > 1  # there was a choice to make


def test_one_candidate_skips_clip_and_bad_images_get_a_row(data, biart, tmp_path):  # noqa: F811
    raw = tmp_path / "raw"
    raw.mkdir()
    src = os.path.join(data["raw"], "00001.tar")
    with tarfile.open(src) as tin, tarfile.open(raw / "00001.tar", "w") as tout:
        for member in tin.getmembers():
            payload = tin.extractfile(member).read()
            if member.name.endswith("0003.jpg"):
                payload = payload[:50]  # a truncated JPEG
            member.size = len(payload)
            tout.addfile(member, io.BytesIO(payload))
    shutil.copy(src.removesuffix(".tar") + "_stats.json", raw / "00001_stats.json")
    summary = run_caption(config(data, biart, tmp_path / "out", shards=str(raw), candidates=1))
    table = pq.read_table(tmp_path / "out" / "00001.parquet").to_pydict()
    assert len(table["key"]) == PER_SHARD and summary["undecodable"] == 1
    bad = table["key"].index("000010003")
    assert table["error"][bad] == "image does not decode" and table["caption"][bad] is None
    assert all(s is None for s in table["clip_score"])
    assert all(c for i, c in enumerate(table["caption"]) if i != bad)


def test_caption_output_of_another_format_is_refused_naming_lverse_caption(data, biart, tmp_path):  # noqa: F811
    """The caption parquet records its format in its schema metadata; evaluate, the report and the
    demo read it, and refuse one of another format or of none, saying to caption again."""
    from lverse.core.formats import CAPTION_FORMAT, CAPTION_FORMAT_KEY
    from lverse.demo import caption_accuracy
    from lverse.pipeline.evaluate import load_predictions
    from lverse.pipeline.report import write_report
    out = tmp_path / "run" / "captions"
    run_caption(config(data, biart, out, shards=os.path.join(data["tokens"], "00000.tar"), candidates=1))
    path = out / "00000.parquet"
    table = pq.read_table(path)
    assert table.schema.metadata[CAPTION_FORMAT_KEY] == str(CAPTION_FORMAT).encode()
    assert sorted(load_predictions(str(out))) == sorted(table.column("key").to_pylist())
    others = {k: v for k, v in table.schema.metadata.items() if k != CAPTION_FORMAT_KEY}
    for found, said in ((None, "records no format version"), (b"0", "is of format 0")):
        pq.write_table(table.replace_schema_metadata(others | ({} if found is None else {CAPTION_FORMAT_KEY: found})),
                       path)
        message = re.escape(f"caption file {path} {said}; this lverse reads format 1 only: caption its shards again "
                            "with `lverse caption` into a new --output folder")
        for read in (lambda: load_predictions(str(out)), lambda: caption_accuracy(str(out), {}),
                     lambda: write_report(str(tmp_path / "run"))):
            with pytest.raises(InputError, match=message):
                read()


def test_token_shards_of_another_vae_are_refused(data, biart, others, tmp_path):  # noqa: F811
    with pytest.raises(InputError, match="another AugVAE"):
        run_caption(config(data, biart, tmp_path / "out", vae=others["vae"], ignore_provenance=True))


@pytest.mark.parametrize("stage", ["caption", "generate"])
@pytest.mark.parametrize("kind", ["vae", "tokenizer"])
def test_an_augvae_or_tokenizer_other_than_the_training_runs_is_refused(data, biart, others, kind, stage,  # noqa: F811
                                                                        tmp_path):
    """Files of the same shape and size load without complaint and give garbage: the hashes the
    checkpoint records catch them, before any work; --ignore-provenance goes on anyway."""
    from lverse.model.checkpoint import PROVENANCE
    from lverse.pipeline.configs import GenerateConfig
    from lverse.pipeline.generate import run_generate
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    images = os.path.join(data["raw"], "00000.tar")  # image shards: the AugVAE encodes them itself

    def run(**over):
        files = {"checkpoint": biart, "vae": data["vae"], "tokenizer": data["tokenizer"], **over}
        if stage == "caption":
            return run_caption(config(data, biart, tmp_path / "out", shards=images, candidates=1, **over))
        return run_generate(GenerateConfig(prompts=str(tmp_path / "prompts.txt"), output=str(tmp_path / "out"),
                                           candidates=1, workers=0, **files))
    given = hashlib.sha256(open(others[kind], "rb").read()).hexdigest()
    trained = hashlib.sha256(open(data[kind], "rb").read()).hexdigest()
    word = {"vae": "AugVAE", "tokenizer": "tokenizer"}[kind]
    assert word in PROVENANCE.values()
    with pytest.raises(InputError, match=f"{word} {re.escape(others[kind])} has sha256 {given[:16]}, "
                                         f"{re.escape(biart)} was trained with {trained[:16]}.*--ignore-provenance"):
        run(**{kind: others[kind]})
    assert not (tmp_path / "out").exists()  # refused before any work
    assert run(**{kind: others[kind]}, ignore_provenance=True)["failed"] == []


def test_a_clip_file_of_another_architecture_is_refused_before_work(data, biart, tmp_path):  # noqa: F811
    import open_clip

    from lverse.core.formats import MODEL_FORMAT
    from lverse.model.checkpoint import save_state
    from lverse.model.clip import register_configs
    register_configs()
    clip = str(tmp_path / "clip.safetensors")
    save_state(open_clip.create_model("lverse-tiny").state_dict(), clip,
               {"format": str(MODEL_FORMAT), "model": "lverse-tiny"})
    with pytest.raises(InputError, match="holds the weights of lverse-tiny, not of ViT-B-32: give --clip lverse-tiny"):
        run_caption(config(data, biart, tmp_path / "out", candidates=2, clip="ViT-B-32", clip_checkpoint=clip))
    assert not (tmp_path / "out").exists()


def test_generate_keeps_the_best_candidate_by_clip_and_resumes(data, biart, tmp_path):  # noqa: F811
    from lverse.pipeline.configs import GenerateConfig
    from lverse.pipeline.generate import run_generate
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle at the top on a blue background\n\nan orange square at the left\n")
    cfg = GenerateConfig(prompts=str(prompts), checkpoint=biart, vae=data["vae"], tokenizer=data["tokenizer"],
                         output=str(tmp_path / "out"), candidates=3, clip="lverse-tiny", workers=0)
    assert run_generate(cfg)["generated"] == 2
    for i, text in enumerate(["a red circle at the top on a blue background", "an orange square at the left"]):
        folder = tmp_path / "out" / f"{i:05d}"
        result = json.loads((folder / "result.json").read_text())
        assert result["prompt"] == text and result["best"] == int(np.argmax(result["scores"]))
        best = Image.open(folder / "best.png")
        assert best.size == (64, 64) and len(list((folder / "candidates").glob("*.png"))) == 3
        chosen = Image.open(folder / "candidates" / f"{result['best']:02d}.png")
        assert np.array_equal(np.asarray(best), np.asarray(chosen))
        assert Image.open(folder / "sheet.png").size[0] > 64 * 2
    again = run_generate(cfg)
    assert (again["generated"], again["skipped"], again["done"]) == (0, 1, 0)  # one item of two prompts


@pytest.mark.slow
def test_ray_actors_write_the_same_captions(data, biart, tmp_path):  # noqa: F811
    """Sampling is seeded per shard: Ray actors and local processes write the same parquet rows."""
    one = os.path.join(data["tokens"], "00002.tar")
    run_caption(config(data, biart, tmp_path / "local", shards=one))
    run_caption(config(data, biart, tmp_path / "ray", shards=one, executor="ray", workers=1))
    local = pq.read_table(tmp_path / "local" / "00002.parquet").to_pydict()
    ray = pq.read_table(tmp_path / "ray" / "00002.parquet").to_pydict()
    assert (local["key"], local["caption"]) == (ray["key"], ray["caption"])
    # CLIP's float sums may round differently with another thread count in the actor
    np.testing.assert_allclose(local["clip_score"], ray["clip_score"], atol=1e-5)


@pytest.mark.slow
def test_generate_on_ray_actors_writes_what_local_workers_write(data, biart, tmp_path):  # noqa: F811
    from lverse.pipeline.configs import GenerateConfig
    from lverse.pipeline.generate import run_generate
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a blue square number {i}\n" for i in range(5)))
    common = dict(prompts=str(prompts), checkpoint=biart, vae=data["vae"], tokenizer=data["tokenizer"],
                  candidates=2, clip="lverse-tiny", prompts_per_item=2)
    local = run_generate(GenerateConfig(**common, output=str(tmp_path / "local")))
    on_ray = run_generate(GenerateConfig(**common, output=str(tmp_path / "ray"), executor="ray", workers=2))
    assert local["generated"] == on_ray["generated"] == 5 and on_ray["shards"] == 3  # items of 2, 2 and 1 prompts
    for i in range(5):
        for name in ("result.json", "best.png"):
            assert (tmp_path / "local" / f"{i:05d}" / name).read_bytes() == \
                (tmp_path / "ray" / f"{i:05d}" / name).read_bytes(), (i, name)


def _token_shard(folder, n, vae_hash, pad=50_000):
    """A token shard of ``n`` samples of random codes, each with ``pad`` bytes of a member caption
    never reads (what makes holding the whole shard in memory show), and its stats file."""
    import tarfile as tf
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "00000.tar")
    rng = np.random.default_rng(0)
    with tf.open(path, "w") as tar:
        for i in range(n):
            codes = io.BytesIO()
            np.save(codes, rng.integers(512, size=64).astype(np.uint16))
            for ext, data in (("codes.npy", codes.getvalue()), ("txt", b"a caption"), ("pad", bytes(pad))):
                info = tf.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(os.path.join(folder, "00000_stats.json"), "w") as f:
        json.dump({"samples": n, "format": TOKEN_SHARD_FORMAT, "vae": vae_hash, "crops": 0}, f)
    return path


def test_caption_streams_a_shard_in_memory_bounded_by_the_batch(data, biart, tmp_path):  # noqa: F811
    """Peak Python memory while captioning a 2,000-sample shard stays within that of a 200-sample
    one plus the rows' text: samples are read as batches need them, not the shard at once
    (holding it would add 2,000 x 50 kB = 100 MB)."""
    import tracemalloc
    vae_hash = hashlib.sha256(open(data["vae"], "rb").read()).hexdigest()
    peaks = {}
    for n in (200, 2000):
        shard = _token_shard(str(tmp_path / f"tokens{n}"), n, vae_hash)
        tracemalloc.start()
        summary = run_caption(config(data, biart, tmp_path / f"out{n}", shards=shard, candidates=1, max_tokens=1,
                                     batch_size=100))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert summary["images"] == n and summary["failed"] == []
    assert peaks[2000] < peaks[200] + 10 * 2**20, peaks  # + 10 MB: 1,800 more rows of text, never 100 MB


def test_a_sample_with_unreadable_codes_gets_an_error_row_not_a_failed_shard(data, biart, tmp_path):  # noqa: F811
    vae_hash = hashlib.sha256(open(data["vae"], "rb").read()).hexdigest()
    shard = _token_shard(str(tmp_path / "tokens"), 6, vae_hash, pad=1)
    broken = str(tmp_path / "broken.tar")
    import tarfile as tf
    with tf.open(shard) as src, tf.open(broken, "w") as dst:
        for member in src:
            data_ = src.extractfile(member).read()
            if member.name == "000002.codes.npy":
                data_ = b"not an array"
            info = tf.TarInfo(member.name)
            info.size = len(data_)
            dst.addfile(info, io.BytesIO(data_))
    os.replace(broken, shard)
    summary = run_caption(config(data, biart, tmp_path / "out", shards=shard, candidates=1, max_tokens=2))
    assert summary["failed"] == []
    table = pq.read_table(tmp_path / "out" / "00000.parquet").to_pydict()
    assert table["error"][2] == "codes do not load as 64 AugVAE codes" and table["caption"][2] is None
    assert all(c for i, c in enumerate(table["caption"]) if i != 2)


@pytest.fixture(scope="module")
def trained_biart(data, tmp_path_factory):  # noqa: F811
    """The debug BiART after 100 plain AdamW steps image->text on the test shards: captions that
    depend on the image, so that precision can change them. Measured (2026-12-07): 35 distinct
    greedy captions of 64 images, 95% of them the same in bf16; after 300 steps 61 distinct and
    all the same, so the test is no weaker for a third of the training."""
    from lverse.model.biart import Direction, build_sequence
    from lverse.runtime.data import TokenBatch
    tok = CaptionTokenizer(data["tokenizer"], offset=512)
    cfg = BiARTConfig(**{**PRESETS["debug"].__dict__, "text_vocab": tok.vocab_size, "text_len": 24})
    samples = [s for shard in sorted(glob.glob(os.path.join(data["tokens"], "*.tar"))) for s in iter_samples(shard)]
    batch = TokenBatch(data["tokenizer"], cfg.text_offset, cfg.text_len, cfg.image_len, cfg.image_vocab, 0.0)(
        samples, [np.random.default_rng(0)] * len(samples))
    seq = build_sequence(batch["text"], batch["image"], Direction.I2T, cfg)
    torch.manual_seed(0)
    model = BiART(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        _, losses = model(seq[:, :-1], Direction.I2T, targets=seq[:, 1:])
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    path = str(tmp_path_factory.mktemp("trained") / "biart.safetensors")
    save_model(model, path, provenance_of(data["vae"], data["tokenizer"]))
    return path


@pytest.mark.slow  # its BiART trains 100 steps first
def test_bf16_greedy_captions_mostly_equal_fp32_and_clip_picks_are_unchanged(data, trained_biart, tmp_path):  # noqa: F811
    """The paper samples in half precision: BiART in bf16 (the AugVAE and CLIP in FP32) gives the
    fp32 model's greedy captions for most images (the share is printed), and with candidates CLIP
    picks from them as it does in fp32."""
    out = {}
    for precision in ("fp32", "bf16"):
        run_caption(config(data, trained_biart, tmp_path / precision, temperature=0.0, candidates=1, max_tokens=24,
                           precision=precision))
        out[precision] = {i: pq.read_table(tmp_path / precision / f"{i:05d}.parquet").to_pydict()
                          for i in range(SHARDS)}
    fp32 = [c for i in range(SHARDS) for c in out["fp32"][i]["caption"]]
    bf16 = [c for i in range(SHARDS) for c in out["bf16"][i]["caption"]]
    share = sum(a == b for a, b in zip(fp32, bf16)) / len(fp32)
    print(f"bf16_greedy_caption_match={share:.3f} ({len(fp32)} images, {len(set(fp32))} distinct captions)")
    assert len(set(fp32)) > 1 and share >= 0.75, (share, fp32[:4], bf16[:4])
    # CLIP (FP32 in both runs) ranks the same candidates alike: given the fp32 run's candidates, the
    # bf16 run's scorer picks what the fp32 run picked
    run_caption(config(data, trained_biart, tmp_path / "c32", candidates=4, keep_candidates=True, precision="fp32",
                       shards=os.path.join(data["tokens"], "00000.tar")))
    run_caption(config(data, trained_biart, tmp_path / "c16", candidates=4, keep_candidates=True, precision="bf16",
                       shards=os.path.join(data["tokens"], "00000.tar")))
    a, b = (pq.read_table(tmp_path / d / "00000.parquet").to_pydict() for d in ("c32", "c16"))
    same = [i for i, (x, y) in enumerate(zip(a["candidates"], b["candidates"])) if x == y]
    assert same, "no image got the same candidates in both precisions"
    for i in same:
        assert a["caption"][i] == b["caption"][i]


def test_half_precision_is_refused_where_it_cannot_run(data, biart, tmp_path):  # noqa: F811
    with pytest.raises(InputError, match="--precision fp16 needs a CUDA device"):
        run_caption(config(data, biart, tmp_path / "out", precision="fp16", candidates=1, device="cpu"))

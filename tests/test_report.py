"""The HTML report, rendered in headless Chromium: every image on the page loads from disk."""

import json
import os
import re
import shutil
import subprocess

import pytest

from lverse.pipeline.caption import run_caption
from lverse.pipeline.generate import GenerateConfig, run_generate
from lverse.pipeline.report import svg_plot, write_report

from .test_caption import biart, config  # noqa: F401
from .test_train import data  # noqa: F401


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is missing (make test installs Debian's chromium)")
    pytest.skip("headless Chromium is missing")


@pytest.mark.slow
def test_report_renders_in_chromium_with_every_image_loaded(data, biart, tmp_path):  # noqa: F811
    run = tmp_path / "run with spaces"
    run_caption(config(data, biart, run / "captions", shards=os.path.join(data["raw"], "00000.tar")))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle at the top\n<script>alert(1)</script> a blue square\n")
    run_generate(GenerateConfig(prompts=str(prompts), checkpoint=biart, vae=data["vae"], tokenizer=data["tokenizer"],
                                output=str(run / "generations"), candidates=2, clip="lverse-tiny"))
    (run / "train").mkdir()
    (run / "train" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "t2i/gen" if s % 2 else "i2t/gen": 6.0 - s * 0.1}) + "\n" for s in range(1, 21)))
    (run / "samples").mkdir()
    shutil.copy(run / "generations" / "00000" / "sheet.png", run / "samples" / "recon_00000010.png")
    (run / "evaluate_captions.json").write_text(json.dumps({"truncated/BLEU-4": 0.25, "untruncated/CIDEr": 0.5}))
    # img2dataset's parquet has key and caption columns too: it is input, not captions to show
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"key": ["00000000"], "caption": ["a download row"], "status": ["success"]}),
                   run / "download.parquet")

    page = write_report(str(run), images=data["raw"], max_captions=5)
    text = open(page).read()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script>alert(1)" not in text  # escaped
    assert "<svg" in text and "truncated/BLEU-4" in text
    assert text.count("truth: ") == 5  # each captioned image with its own caption from the shard
    assert "a download row" not in text
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=10000", "--dump-dom", f"file://{page}"],
                         capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, dom[-2000:]
    # 5 captioned images, 2 prompts x (first candidate + reranked), 1 reconstruction grid
    assert int(total.group(1)) == 5 + 4 + 1
    assert loaded.group(1) == total.group(1)


def test_svg_plot_draws_every_series():
    svg = svg_plot({"a": [(1, 2.0), (2, 1.0)], "b": [(1, 3.0), (2, 2.5)]})
    assert svg.count("<polyline") == 2 and svg.startswith("<svg")


def test_an_empty_run_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nothing to report"):
        write_report(str(tmp_path))

"""The HTML report, rendered in headless Chromium: every image on the page loads from disk."""

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from lverse.pipeline.caption import run_caption
from lverse.pipeline.configs import GenerateConfig
from lverse.pipeline.generate import run_generate
from lverse.pipeline.report import svg_plot, write_report

from .test_caption import config


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
                                output=str(run / "generations"), candidates=2, clip="lverse-tiny", workers=0))
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
    assert _comparison_rows(page)[0][1:5] == ["truncated/BLEU-4", "L-Verse, truncated", "39.9", "25"]  # the paper's
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


def _comparison_rows(page: str) -> list[list[str]]:
    """The cells of the page's side-by-side table with the paper, row by row (header left out)."""
    from html.parser import HTMLParser

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.inside, self.rows = False, []

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.inside = ("class", "paper-comparison") in attrs
            elif tag == "tr" and self.inside:
                self.rows.append([])
            elif tag == "td" and self.inside:
                self.rows[-1].append("")

        def handle_endtag(self, tag):
            if tag == "table":
                self.inside = False

        def handle_data(self, text):
            if self.inside and self.rows and self.rows[-1]:
                self.rows[-1][-1] += text

    parser = Rows()
    parser.feed(open(page).read())
    return [r for r in parser.rows if r]


def test_report_puts_the_papers_figures_beside_the_runs(tmp_path):
    # as `lverse evaluate captions --output` and `evaluate fid --output` write them
    spice = ("not computed: SPICE needs Stanford CoreNLP 3.6.0 (stanford-corenlp-3.6.0.jar) in "
             "/opt/venv/lib/python3.11/site-packages/pycocoevalcap/spice/lib, from http://nlp.example/corenlp.zip")
    captions = {"images": 5000, "images_without_prediction": 0, "captions_truncated": 812,
                **{f"{way}/{m}": v for way in ("truncated", "untruncated")
                   for m, v in (("BLEU-1", 0.71), ("BLEU-2", 0.55), ("BLEU-3", 0.41), ("BLEU-4", 0.301),
                                ("METEOR", 0.262), ("ROUGE-L", 0.533), ("CIDEr", 0.9512))},
                "truncated/SPICE": spice, "untruncated/SPICE": 0.2}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "evaluate_captions.json").write_text(json.dumps(captions, indent=2))
    (tmp_path / "evaluate_fid.json").write_text(json.dumps({"images": 30000, "FID-0": 52.25, "FID-2": 30.5}))
    page = write_report(str(tmp_path))
    rows = _comparison_rows(page)
    assert "<h2>Against the paper</h2>" in open(page).read()  # the paper's sets: 5,000 and 30,000 images
    by = {(r[1], r[2]): r for r in rows}
    table, key, model, paper, run, source = by[("truncated/CIDEr", "L-Verse, truncated")]
    assert (paper, run, source) == ("102.2", "95.12", os.path.join("eval", "evaluate_captions.json"))
    assert table.startswith("Table 2")
    assert by[("untruncated/BLEU-4", "L-Verse, untruncated")][3:5] == ["27.6", "30.1"]
    # why it is missing, not a number, and where without the installation's path
    assert by[("truncated/SPICE", "L-Verse, truncated")][4] == (
        "not computed: SPICE needs Stanford CoreNLP 3.6.0 (stanford-corenlp-3.6.0.jar) in pycocoevalcap/spice/lib, "
        "from http://nlp.example/corenlp.zip")
    assert by[("FID-0", "L-Verse (trained on MS-COCO)")][3:5] == ["45.8", "52.25"]  # FID is not scaled
    assert by[("FID-2", "L-Verse (trained on MS-COCO)")][3] == "not recorded here"
    assert by[("FID-2", "L-Verse-CC (trained on CC3M)")][3] == "25.7"
    assert not any(r[1] in ("FID", "FID-1", "truncated/BLEU-1") for r in rows)  # only what both have


def test_paper_figures_name_keys_that_evaluate_writes():
    from lverse.pipeline.report import PAPER
    keys = {f.key for f in PAPER}
    assert {f"{w}/{m}" for w in ("truncated", "untruncated") for m in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
                                                                        "SPICE")} <= keys
    assert {"FID", "FID-0", "FID-1", "FID-2", "FID-4", "FID-8"} <= keys  # reconstruction_fid, generation_fid


def test_a_run_without_evaluation_output_renders_without_the_comparison(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) + "\n"
                                                    for s in range(1, 6)))
    page = write_report(str(tmp_path))
    assert "<svg" in open(page).read() and _comparison_rows(page) == []


def _headings(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", open(page).read())


def test_a_demo_run_leads_with_what_it_shows_and_not_with_the_paper(tmp_path):
    (tmp_path / "demo_results.json").write_text(json.dumps({
        "caption_accuracy": 0.91, "caption_accuracy_first_candidate": 0.67, "t2i_color_accuracy": 0.98,
        "t2i_color_accuracy_first_candidate": 0.8, "heldout_images": 100}))
    (tmp_path / "evaluate_captions.json").write_text(json.dumps({"images": 100, "truncated/BLEU-4": 0.971}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) + "\n"
                                                    for s in range(1, 6)))
    page = write_report(str(tmp_path))
    headings = _headings(page)
    assert headings[0] == "What this run shows", headings
    assert headings.index("Training curves") < headings.index("Metrics") < len(headings) - 1
    assert headings[-1] == "The paper's figures, not comparable with this run's"  # the demo's BLEU is no claim
    text = open(page).read()
    assert "synthetic demo" in text and "Against the paper" not in text
    headline = text[text.index("What this run shows"):text.index("Training curves")]
    assert "<td>t2i_color_accuracy</td>" in headline and "<td>0.98</td><td>0.80</td>" in headline


def test_figures_of_another_set_size_are_not_comparable(tmp_path):
    (tmp_path / "evaluate_captions.json").write_text(json.dumps({"images": 100, "truncated/BLEU-4": 0.3}))
    page = write_report(str(tmp_path))
    assert _headings(page) == ["Metrics", "The paper's figures, not comparable with this run's"]
    assert "evaluate_captions.json holds 100 images where the paper&#x27;s Table 2 used 5,000" in open(page).read()


def test_a_start_on_fewer_ranks_is_recorded_once_and_marked_on_the_curve(tmp_path):
    """Steps 1-6 logged on 3 ranks; the run resumes from step 4 on 2: the first step done after the
    start records the re-formation (and only it), the readers of the curves skip the event, and the
    report marks the step on the loss curve. A start on the same number of ranks records nothing."""
    from lverse.runtime.metrics import MetricsLogger, events, read_records, run_history, step_records

    first = MetricsLogger(str(tmp_path), 0, tensorboard=False, world_size=3)
    for step in range(1, 7):
        first.log({"step": step, "loss": 5.0 - step / 10})
    last_logged = time.time()
    again = MetricsLogger(str(tmp_path), 0, tensorboard=False, world_size=2)
    again.first_step_done(5)
    again.log({"step": 5, "loss": 4.5})
    again.first_step_done(6)  # one record a start
    records = read_records(str(tmp_path / "metrics.jsonl"))
    (event,) = events(records, "reformed")
    assert {k: event[k] for k in ("step", "last_step_before", "world_size_before", "world_size")} == \
        {"step": 5, "last_step_before": 6, "world_size_before": 3, "world_size": 2}
    assert 0 <= event["seconds_lost"] <= time.time() - last_logged + 1
    assert [r["step"] for r in step_records(records)] == [1, 2, 3, 4, 5, 6, 5]
    # the curves: each step as last logged, in order (the resumed run's step 5, not 5, 6, 5)
    assert [(r["step"], r["world_size"]) for r in run_history(records)] == [(1, 3), (2, 3), (3, 3), (4, 3), (5, 2)]
    assert {r["world_size"] for r in step_records(records)} == {3, 2}
    MetricsLogger(str(tmp_path), 0, tensorboard=False, world_size=2).first_step_done(6)
    assert len(events(read_records(str(tmp_path / "metrics.jsonl")), "reformed")) == 1
    page = open(write_report(str(tmp_path))).read()
    assert page.count('class="mark"') == 1 and "step 5: re-formed on 2 ranks (from 3)" in page
    assert "3\u21922 ranks</text>" in page

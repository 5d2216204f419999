"""`lverse report RUN_DIR`: one static HTML page of a run, opened from disk with no server.

It gathers what the stages left under RUN_DIR (any depth), and shows first what the run shows
(the demo's two accuracies, the images and captions), then the figures:

- the headline: the accuracies of a ``demo_results.json`` (``lverse demo``), CLIP-reranked and of
  the first candidate;
- training curves from every ``metrics.jsonl`` (BiART: loss per direction and segment; AugVAE:
  loss, perplexity), drawn as inline SVG (no plotting library);
- metrics from ``evaluate*.json`` / ``metrics*.json`` files (``lverse evaluate --output``) and a
  ``demo_results.json`` when present; a value that is a sentence (why a metric was not computed)
  without its installation paths; those the paper reports (``PAPER``) also in a table beside the
  paper's figures, headed as comparable only when each evaluation holds as many images as the
  paper's set and the run is no demo (a synthetic run's BLEU beside the paper's reads as a claim);
- reconstructions: the newest ``samples/recon_*.png`` of an AugVAE run;
- generated images with their prompts: ``*/result.json`` of ``lverse generate`` (the chosen image,
  and its contact sheet);
- captions beside their images: the parquet files of ``lverse caption`` (those with a
  ``clip_score`` column), with the images and their own captions looked up by key in ``--images``
  (image shards), up to ``--max-captions``; the first candidate too when it was kept and differs.

Images are copied to ``RUN_DIR/report/assets/`` and referenced relatively; the page is
``RUN_DIR/report/index.html``. A small script marks on load how many images loaded
(``data-images-loaded`` / ``data-images-total`` on ``<body>``), which the test reads in Chromium.
"""

from __future__ import annotations

import glob
import html
import json
import os
import re
import shutil
from dataclasses import dataclass

from lverse.core import storage
from lverse.core.errors import InputError
from lverse.core.files import atomic_output
from lverse.core.formats import check_captions, is_caption_table
from lverse.core.shards import expand_shards, iter_samples
from lverse.runtime.metrics import events, read_records, run_history

SKIP = ("report",)  # our own output is not input


@dataclass(frozen=True)
class PaperFigure:
    """One number of the paper (Kim et al., "L-Verse", CVPR 2022, arXiv 2111.11133) and the key
    ``lverse evaluate`` writes the same measurement under."""
    table: str  # the paper's table
    key: str  # the key in ``lverse evaluate --output`` json
    model: str  # the paper's model (and data) the figure is of
    paper: float | None  # as the paper prints it; None: not recorded here
    images: int  # the size of the paper's evaluation set: a run's figure on another set is not comparable
    scale: float = 1.0  # a run's value x scale is in the paper's units (pycocoevalcap's fractions x 100)


def _table2(way: str, values: tuple[float, ...]) -> list[PaperFigure]:
    return [PaperFigure("Table 2, image to text (Karpathy test)", f"{way}/{metric}", f"L-Verse, {way}", value,
                        KARPATHY_TEST, 100.0)
            for metric, value in zip(("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"), values)]


KARPATHY_TEST, IMAGENET_VAL, T2I_PROMPTS = 5000, 50000, 30000
_T3 = "Table 3, text to image (30,000 MS-COCO val2014 captions)"
# The one place of the paper's figures in the code (docs/paper.md lists them and says where they
# come from). Table 2 as docs/paper.md gives it; Tables 1
# and 3 as a public listing of the paper's results gives them, not checked against its PDF. The FIDs
# of L-Verse trained on MS-COCO at blur radii 2, 4 and 8 were not found, so they are None, not a guess.
PAPER: tuple[PaperFigure, ...] = (
    PaperFigure("Table 1, reconstruction (ImageNet1K val, 256x256)", "FID", "AugVAE-ML", 1.04, IMAGENET_VAL),
    PaperFigure("Table 1, reconstruction (ImageNet1K val, 256x256)", "FID", "AugVAE-SL", 3.28, IMAGENET_VAL),
    *_table2("truncated", (39.9, 31.4, 60.4, 102.2, 23.3)),
    *_table2("untruncated", (27.6, 23.6, 43.9, 181.6, 28.9)),
    *(PaperFigure(_T3, f"FID-{r}", "L-Verse (trained on MS-COCO)", v, T2I_PROMPTS) for r, v in
      ((0, 45.8), (1, 41.9), (2, None), (4, None), (8, None))),
    *(PaperFigure(_T3, f"FID-{r}", "L-Verse-CC (trained on CC3M)", v, T2I_PROMPTS) for r, v in
      ((0, 37.2), (1, 31.6), (2, 25.7), (4, 21.4), (8, 21.1))),
)


def paper_comparison(metrics: dict[str, dict]) -> list[tuple[PaperFigure, str, object]]:
    """(figure, file, the run's value in the paper's units) for each figure of ``PAPER`` whose key
    a metrics file holds; ``metrics`` maps each file to its json. A value that is no number (SPICE
    that was not computed says why) is passed as it is."""
    rows = []
    for figure in PAPER:
        for path, data in metrics.items():
            value = data.get(figure.key)
            if value is None or isinstance(value, (bool, dict, list)):
                continue
            rows.append((figure, path, value * figure.scale if isinstance(value, (int, float)) else value))
    return rows


def not_comparable(metrics: dict[str, dict]) -> str | None:
    """Why the paper's figures cannot be set beside this run's as a comparison, or None when each
    evaluation the comparison draws on holds as many images as the paper's set: a demo run (its
    ``demo_results.json``) is on synthetic shapes, and another number of images is another set."""
    if any(os.path.basename(path) == "demo_results.json" for path in metrics):
        return "this run is the synthetic demo (coloured shapes), not the paper's data"
    for figure, path, _ in paper_comparison(metrics):
        images = metrics[path].get("images")
        if images != figure.images:
            return (f"{path} holds {'an unknown number of' if images is None else images} images where the "
                    f"paper's {figure.table.split(',')[0]} used {figure.images:,}")
    return None


def _paper_section(metrics: dict[str, dict]) -> str:
    rows = paper_comparison(metrics)
    if not rows:
        return ""
    esc = html.escape
    cells = "".join(
        f"<tr><td>{esc(f.table)}</td><td>{esc(f.key)}</td><td>{esc(f.model)}</td>"
        f'<td class="paper">{"not recorded here" if f.paper is None else f"{f.paper:g}"}</td>'
        f'<td class="run">{esc(f"{v:.4g}" if isinstance(v, float) else _short(v))}</td><td>{esc(path)}</td></tr>'
        for f, path, v in rows)
    why = not_comparable(metrics)
    heading = ("<h2>Against the paper</h2><p>the paper's figures (Kim et al., CVPR 2022) beside this run's"
               if why is None else
               "<h2>The paper's figures, not comparable with this run's</h2><p>not comparable: " + esc(why) +
               "; shown for reference only: the paper's figures")
    return (heading + " in the paper's units (caption metrics x 100); docs/paper.md says how each was made</p>"
            '<table class="paper-comparison"><tr><th>table</th><th>metric</th><th>paper model</th><th>paper</th>'
            f"<th>this run</th><th>file</th></tr>{cells}</table>")


# An absolute path inside a message (not a URL's): the report names where, not which installation.
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])/[^\s,;()]+")


def _short(value) -> str:
    """A metric's value as the page shows it: a number to 4 digits; a sentence (why a metric was not
    computed) with each absolute path cut to its installed package's path (or its last two parts),
    so that it reads in one line on any machine."""
    if isinstance(value, float):
        return f"{value:.4g}"

    def cut(match: re.Match) -> str:
        path = match.group(0)
        for marker in ("site-packages/", "dist-packages/"):
            if marker in path:
                return path.split(marker, 1)[1]
        return "/".join(path.rstrip("/").split("/")[-2:])
    return _ABSOLUTE_PATH.sub(cut, str(value))


def _headline(metrics: dict[str, dict]) -> str:
    """What a demo run shows, first: each accuracy of its ``demo_results.json``, CLIP-reranked and of
    the first candidate, with what it judges."""
    judged = {"caption_accuracy": "held-out images whose caption names the right colour and shape",
              "t2i_color_accuracy": "held-out prompts whose generated image shows the prompted colour"}
    esc, rows = html.escape, []
    for path, data in metrics.items():
        if os.path.basename(path) != "demo_results.json":
            continue
        for key, value in data.items():
            if key.endswith("accuracy") and isinstance(value, (int, float)):
                first = data.get(f"{key}_first_candidate")
                rows.append(f"<tr><td>{esc(key)}</td><td>{esc(judged.get(key, ''))}</td><td>{value:.2f}</td>"
                            f"<td>{'' if first is None else f'{first:.2f}'}</td></tr>")
    if not rows:
        return ""
    return ('<h2>What this run shows</h2><table class="headline"><tr><th>accuracy</th><th>the share of</th>'
            f"<th>CLIP-reranked</th><th>first candidate</th></tr>{''.join(rows)}</table>")


def _find(run_dir: str, pattern: str) -> list[str]:
    found = glob.glob(os.path.join(glob.escape(run_dir), "**", pattern), recursive=True)
    return sorted(p for p in found if os.path.relpath(p, run_dir).split(os.sep)[0] not in SKIP)


def svg_plot(series: dict[str, list[tuple[float, float]]], width: int = 420, height: int = 220,
             marks: list[tuple[float, str, str]] = ()) -> str:
    """Line plot of named (x, y) series as inline SVG, axes labelled with their ranges; ``marks``:
    (x, label, tooltip) drawn as dashed vertical lines, the short label above the plot area."""
    points = [p for s in series.values() for p in s]
    if not points:
        return ""
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad, colors = 36, ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    sx = lambda x: pad + (x - x0) / (x1 - x0) * (width - 2 * pad)  # noqa: E731
    sy = lambda y: height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="plot">',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" '
             'stroke="#bbb"/>',
             f'<text x="{pad}" y="{height - 8}" font-size="11">step {x0:g}</text>',
             f'<text x="{width - pad}" y="{height - 8}" font-size="11" text-anchor="end">{x1:g}</text>',
             f'<text x="2" y="{pad + 4}" font-size="11">{y1:.3g}</text>',
             f'<text x="2" y="{height - pad}" font-size="11">{y0:.3g}</text>']
    for k, (name, pts) in enumerate(series.items()):
        color = colors[k % len(colors)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{line}"/>')
        parts.append(f'<text x="{width - pad - 4}" y="{pad + 14 + 13 * k}" font-size="11" fill="{color}" '
                     f'text-anchor="end">{html.escape(name)}</text>')
    for x, label, tooltip in marks:
        if x0 <= x <= x1:
            parts.append(f'<g class="mark"><title>{html.escape(tooltip)}</title>'
                         f'<line x1="{sx(x):.1f}" y1="{pad}" x2="{sx(x):.1f}" y2="{height - pad}" stroke="#888" '
                         f'stroke-dasharray="4 3"/><text x="{sx(x):.1f}" y="{pad - 4}" font-size="10" '
                         f'text-anchor="middle" fill="#666">{html.escape(label)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _curves(path: str) -> str:
    """The plots of one ``metrics.jsonl`` (each step as last logged: a resumed run redid some);
    its re-formations (a start on another number of ranks) are marked on the loss curve."""
    series: dict[str, list[tuple[float, float]]] = {}
    records = read_records(path)
    for m in run_history(records):
        for key, value in m.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    key.endswith(("/ref", "/gen")) or key in ("loss", "perplexity")):
                series.setdefault(key, []).append((m["step"], float(value)))
    marks = [(e["step"], f"{e['world_size_before']}\u2192{e['world_size']} ranks",
              f"step {e['step']}: re-formed on {e['world_size']} ranks (from {e['world_size_before']}), "
              f"{e['seconds_lost']:.0f} s lost") for e in events(records, "reformed")]
    plots = []
    losses = {k: v for k, v in series.items() if k != "perplexity"}
    if losses:
        plots.append(svg_plot(losses, marks=marks))
    if "perplexity" in series:
        plots.append(svg_plot({"codebook perplexity": series["perplexity"]}))
    return "".join(plots)


class _Assets:
    def __init__(self, folder: str):
        self.folder, self.n = folder, 0
        os.makedirs(folder, exist_ok=True)

    def copy(self, src: str) -> str:
        self.n += 1
        name = f"{self.n:04d}{os.path.splitext(src)[1]}"
        shutil.copy(src, os.path.join(self.folder, name))
        return f"assets/{name}"

    def write(self, data: bytes, ext: str) -> str:
        self.n += 1
        name = f"{self.n:04d}{ext}"
        with open(os.path.join(self.folder, name), "wb") as f:
            f.write(data)
        return f"assets/{name}"


def _samples_by_key(shards: str | None, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """The image-shard samples (jpg, txt, ...) of the given keys."""
    if not shards or not keys:
        return {}
    found = {}
    for shard in expand_shards(shards):
        for sample in iter_samples(shard):
            if sample["__key__"] in keys:
                found[sample["__key__"]] = sample
        if len(found) == len(keys):
            break
    return found


def write_report(run_dir: str, images: str | None = None, max_captions: int = 24, title: str | None = None) -> str:
    """Write RUN_DIR/report/index.html; returns its path."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a folder")
    out = os.path.join(run_dir, "report")
    shutil.rmtree(os.path.join(out, "assets"), ignore_errors=True)
    assets = _Assets(os.path.join(out, "assets"))
    esc = html.escape
    sections: dict[str, str] = {}  # by name; the page puts them in PAGE_ORDER

    metrics, by_file = [], {}
    found = [p for pattern in ("demo_results.json", "evaluate*.json", "metrics*.json") for p in _find(run_dir, pattern)]
    for path in found:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            continue
        by_file[os.path.relpath(path, run_dir)] = data
        rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(_short(v))}</td></tr>" for k, v in data.items()
                       if not isinstance(v, (dict, list)))
        metrics.append(f"<h3>{esc(os.path.relpath(path, run_dir))}</h3><table>{rows}</table>")
    curves = [(p, _curves(p)) for p in _find(run_dir, "metrics.jsonl")]
    if any(svg for _, svg in curves):
        sections["curves"] = ("<h2>Training curves</h2>" + "".join(
            f"<h3>{esc(os.path.relpath(os.path.dirname(p), run_dir) or '.')}</h3>{svg}" for p, svg in curves if svg))

    recons = _find(run_dir, "recon_*.png")
    if recons:
        sections["reconstructions"] = ("<h2>Reconstructions</h2><p>originals above, AugVAE reconstructions below</p>"
                                       f'<img src="{assets.copy(recons[-1])}" alt="reconstructions">')

    generated = []
    for path in _find(run_dir, "result.json"):
        folder = os.path.dirname(path)
        with open(path) as f:
            result = json.load(f)
        if "prompt" not in result or not os.path.isfile(os.path.join(folder, "best.png")):
            continue
        score = "" if result.get("clip_score") is None else f" (CLIP {result['clip_score']:.3f})"
        first = os.path.join(folder, "candidates", "00.png")
        pair = f'<img src="{assets.copy(os.path.join(folder, "best.png"))}" alt="reranked" title="reranked">'
        if os.path.isfile(first):
            pair = (f'<img src="{assets.copy(first)}" alt="first candidate" title="first candidate">' + pair)
        generated.append(f'<figure>{pair}<figcaption>{esc(result["prompt"])}{esc(score)}</figcaption></figure>')
    if generated:
        sections["text to image"] = ("<h2>Text to image</h2><p>first candidate, then the one CLIP chose</p>"
                                     f'<div class="grid">{"".join(generated)}</div>')

    caption_rows = []
    for path in _find(run_dir, "*.parquet"):
        table = storage.read_parquet(path)
        if not is_caption_table(table):  # img2dataset's parquet, say
            continue
        check_captions(table, path)
        caption_rows += [r for r in table.to_pylist() if r.get("caption")]
    if caption_rows:
        caption_rows = caption_rows[:max_captions]
        samples = _samples_by_key(images, {r["key"] for r in caption_rows})
        figures = []
        for r in caption_rows:
            files = samples.get(r["key"], {})
            img = f'<img src="{assets.write(files["jpg"], ".jpg")}" alt="{esc(r["key"])}">' if "jpg" in files else ""
            text = f"<b>{esc(r['caption'])}</b>"
            if r.get("candidates") and r["candidates"][0] != r["caption"]:
                text += f"<br>first candidate: {esc(r['candidates'][0])}"
            if "txt" in files:
                text += f"<br>truth: {esc(files['txt'].decode('utf-8', errors='replace'))}"
            figures.append(f"<figure>{img}<figcaption>{text}</figcaption></figure>")
        sections["image to text"] = (
            "<h2>Image to text</h2><p>the caption CLIP chose (the first candidate below it when "
            f'that differs), and the image\'s own caption</p><div class="grid">{"".join(figures)}</div>')
    if metrics:
        sections["headline"] = _headline(by_file)
        sections["metrics"] = "<h2>Metrics</h2>" + "".join(metrics)
        sections["paper"] = _paper_section(by_file)

    if not sections:
        raise InputError(f"{run_dir} holds nothing to report (no metrics.jsonl, evaluation json, generations, "
                         "captions or reconstructions)")
    page = _PAGE.format(title=esc(title or f"lverse run {os.path.basename(os.path.abspath(run_dir))}"),
                        body="\n".join(sections[name] for name in PAGE_ORDER if sections.get(name)))
    path = os.path.join(out, "index.html")
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(page)
    return path


# What a reader looks for first: what the run shows (its accuracies, images and captions), then how
# it trained, then the figures, and the paper's last.
PAGE_ORDER = ("headline", "text to image", "image to text", "reconstructions", "curves", "metrics", "paper")

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
td, th {{ border: 1px solid #ddd; padding: 2px 8px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 180px; font-size: 13px; }}
figure img {{ width: 84px; image-rendering: pixelated; margin-right: 4px; }}
</style></head>
<body>
<h1>{title}</h1>
{body}
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""

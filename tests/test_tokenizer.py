import hashlib
import subprocess
import sys

import numpy as np
import pytest

from lverse.preprocessing.synthetic import draw_sample
from lverse.preprocessing.text_tokenizer import CaptionTokenizer, iter_captions, normalize_caption


@pytest.fixture(scope="module")
def captions():
    rng = np.random.default_rng(0)
    return [draw_sample(rng, size=16)[1] for _ in range(300)]


@pytest.fixture(scope="module")
def tok(captions, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "captions"
    return CaptionTokenizer.fit(captions, str(prefix), vocab_size=80, offset=512, dropout=0.1)


def test_round_trip_in_biart_id_range(tok, captions):
    assert tok.vocab_size == 80 and tok.pad_id == 592
    ids = tok.encode(captions[:20], length=32)
    assert ids.shape == (20, 32)
    assert ((ids >= 512) & (ids <= tok.pad_id)).all()
    for row, caption in zip(ids, captions):
        assert (row == tok.pad_id).any(), "a short caption ends with PAD"
        assert tok.decode(row) == caption


def test_decode_stops_at_end_of_text_and_skips_other_ids(tok):
    ids = tok.encode(["a red circle at the left on a blue background"], length=32)[0].tolist()
    n = ids.index(tok.pad_id)
    noisy = ids[:2] + [5, 100] + ids[2:n] + [tok.pad_id] + ids[:3]
    assert tok.decode(noisy) == "a red circle at the left on a blue background"


def test_truncation(tok):
    ids = tok.encode(["a red circle at the left on a blue background"], length=3)
    assert ids.shape == (1, 3) and (ids != tok.pad_id).all()


def test_bpe_dropout_only_when_training(tok, captions):
    text = captions[:8]
    evals = {tuple(tok.encode(text, 32).flatten().tolist()) for _ in range(10)}
    assert len(evals) == 1, "without training mode the pieces are deterministic"
    trains = [tok.encode(text, 32, training=True) for _ in range(10)]
    assert len({tuple(t.flatten().tolist()) for t in trains}) > 1, "dropout varies the pieces"
    for t in trains:  # a different segmentation of the same text
        assert [tok.decode(row) for row in t] == text


def test_normalisation():
    assert normalize_caption("  a  café\n\tnear   the sea ") == "a café near the sea"
    assert normalize_caption("cafÃ©") == "café"  # mojibake fixed by ftfy
    assert normalize_caption("fish &amp; chips") == "fish & chips"


def test_too_many_pieces_is_a_clear_error(captions, tmp_path):
    with pytest.raises(ValueError, match="smaller vocab_size"):
        CaptionTokenizer.fit(captions, str(tmp_path / "big"), vocab_size=50000)
    assert not list(tmp_path.glob("big*")), "nothing half-written"


def test_the_same_captions_fit_the_same_bytes_wherever_written(tok, captions, tmp_path):
    """Models record the tokenizer's sha256 as their provenance: a refit of the same captions (a
    pipeline rerun after a kill mid-fit) must be the same file, whatever folder it was fitted in."""
    again = CaptionTokenizer.fit(captions, str(tmp_path / "elsewhere" / "captions"), vocab_size=80, offset=512)
    for ext in (".model", ".vocab"):  # compared by digest: pytest's diff of two long byte strings takes minutes
        digests = [hashlib.sha256(open(model.model_path.removesuffix(".model") + ext, "rb").read()).hexdigest()
                   for model in (tok, again)]
        assert digests[0] == digests[1], ext
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["captions.model", "captions.vocab"]


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="lverse tokenizer"):
        CaptionTokenizer(str(tmp_path / "none.model"))


def test_captions_from_both_conceptual_captions_layouts(tmp_path):
    cc3m = tmp_path / "cc3m.tsv"
    cc3m.write_text("a dog on a beach\thttp://x/1.jpg\nsunset\thttps://x/2.jpg\n\t\n")
    cc12m = tmp_path / "cc12m.tsv"
    cc12m.write_text("http://x/1.jpg\ta dog on a beach\nhttps://x/2.jpg\tsunset\n")
    assert list(iter_captions(str(cc3m))) == list(iter_captions(str(cc12m))) == ["a dog on a beach", "sunset"]


def test_bpe_dropout_depends_only_on_its_seed(tmp_path):
    """Without dropout our merges equal SentencePiece's encoding (unknown characters included);
    with it, a caption's pieces depend only on its seed, in any process."""
    rng = np.random.default_rng(0)
    captions = [draw_sample(rng, 32)[1] for _ in range(100)] + ["Ünïcode   café, 100% — “quotes” 東京"]
    tok = CaptionTokenizer.fit(captions, str(tmp_path / "tok"), vocab_size=64, offset=512)
    tok.dropout = 0.0
    for c in captions:
        assert tok._bpe_dropout(normalize_caption(c), b"any") == tok.sp.encode(normalize_caption(c))
    tok.dropout = 0.1
    here = [tok.pieces(captions[0], True, bytes([s])) for s in range(20)]
    assert len({tuple(p) for p in here}) > 1  # dropout does change the segmentation
    assert all(tok.sp.decode(p) == normalize_caption(captions[0]) for p in here)
    code = ("import sys; from lverse.preprocessing.text_tokenizer import CaptionTokenizer; "
            "t = CaptionTokenizer(sys.argv[1], offset=512, dropout=0.1); "
            "print([t.pieces(sys.argv[2], True, bytes([s])) for s in range(20)])")
    out = subprocess.run([sys.executable, "-c", code, tok.model_path, captions[0]], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == str(here)

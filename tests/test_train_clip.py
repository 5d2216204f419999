"""`lverse train-clip`: a tiny open_clip model learns from image shards, and caption/generate's
CLIP scorer loads what it wrote."""

from __future__ import annotations

import pytest
import torch

from lverse.model.clip import ClipScorer
from lverse.pipeline.configs import ClipTrainConfig
from lverse.pipeline.train_clip import train_clip

from .test_encode import raw_shards


@pytest.mark.slow
def test_train_clip_lowers_its_loss_and_the_scorer_loads_the_weights(tmp_path):
    shards = raw_shards(str(tmp_path / "raw"), count=2, n=16)
    out = tmp_path / "clip.safetensors"
    result = train_clip(ClipTrainConfig(shards=shards, output=str(out), steps=20, batch_size=32, warmup_steps=5,
                                        eval_shards=shards))
    assert result["pairs"] == 32 and result["last_loss"] < result["first_loss"]
    # Scored on the pairs it trained on, among 32 distinct captions: chance is 1/32 (one image in
    # 32); 20 steps find the caption of 26 (measured; 22 after 15 steps, 31 after 40).
    assert result["heldout"]["distinct_captions"] == 32
    assert result["heldout"]["image_to_text_top1_distinct"] >= 16 / 32
    scorer = ClipScorer("lverse-tiny", checkpoint=str(out))
    from safetensors.torch import load_file
    saved = load_file(str(out))
    assert all(torch.equal(v, saved[k]) for k, v in scorer.model.state_dict().items())


def test_a_clip_file_of_another_architecture_or_format_is_refused_and_open_clips_own_loads(tmp_path):
    """What `lverse train-clip` writes records its architecture and format: given with another
    --clip, or of another format, it is refused on one line saying what to give; a checkpoint of
    open_clip's own (no lverse metadata) loads as open_clip loads it."""
    import open_clip

    from lverse.core.errors import InputError
    from lverse.core.formats import MODEL_FORMAT
    from lverse.model.checkpoint import save_state
    from lverse.model.clip import register_configs
    register_configs()
    state = open_clip.create_model("lverse-tiny").state_dict()
    ours = str(tmp_path / "ours.safetensors")
    save_state(state, ours, {"format": str(MODEL_FORMAT), "model": "lverse-tiny"})
    with pytest.raises(InputError, match=f"CLIP file {ours} holds the weights of lverse-tiny, not of RN50: "
                                         "give --clip lverse-tiny"):
        ClipScorer("RN50", checkpoint=ours)
    save_state(state, ours, {"model": "lverse-tiny"})
    with pytest.raises(InputError, match="records no format version; .* `lverse train-clip`"):
        ClipScorer("lverse-tiny", checkpoint=ours)
    theirs = str(tmp_path / "open_clip.safetensors")
    save_state(state, theirs, {})
    scorer = ClipScorer("lverse-tiny", checkpoint=theirs)
    assert all(torch.equal(v, state[k]) for k, v in scorer.model.state_dict().items())


def test_train_clip_refuses_shards_that_do_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        train_clip(ClipTrainConfig(shards=str(tmp_path / "none"), output=str(tmp_path / "c.safetensors"), steps=1))

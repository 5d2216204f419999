"""Chaos per stage (tests/chaos.py): SIGKILLs of random processes of a stage at random moments (the
driver, a pool worker, its guard, the resource tracker, a DataLoader worker), then nothing of the
killed run left, and the same command's outputs those of an uninterrupted run, byte for byte (the
training stage: exported weights and every logged loss). One round of up to three kills per stage
here, seeded: the kill schedule is printed, and a failure is hunted further with
``python benchmarks/chaos.py --stage S --rounds N --seed K``.

Every stage runs here: encode (a local pool: workers, guards, the resource tracker), download
(img2dataset in the workers), caption and generate (a model in each pool worker), train (DataLoader
workers), train-vae (the tiny preset: every phase in seconds) and `lverse pipeline run` (download,
tokenizer and encode on a private local Ray: raylet, GCS, Ray's agents and workers, lverse's guard
of that Ray). Each test is three runs of its stage (uninterrupted, killed, rerun): encode,
download and train 11-18 s, the others 48-63 s, on the loaded 2-core machine.
"""

from __future__ import annotations

import pytest

from .chaos import chaos, stage

# the fixtures each stage's inputs come from (tests/conftest.py), by the name tests/chaos.py gives them
NEEDS = {"encode": {"vae": "vae_path"}, "download": {"server": "server"}, "train": {"data": "data"},
         "caption": {"data": "data", "biart": "biart"}, "generate": {"data": "data", "biart": "biart"},
         "train-vae": {"data": "data"}, "pipeline": {"server": "server", "vae": "vae_path"}}
SEED = 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEEDS))
def test_a_stage_killed_at_random_leaves_nothing_and_finishes_with_the_same_outputs(name, tmp_path, request):
    files = {key: request.getfixturevalue(fixture) for key, fixture in NEEDS[name].items()}
    result = chaos(stage(name, str(tmp_path / "inputs"), files), str(tmp_path), rounds=1, seed=SEED)
    assert result.kills >= 1
    assert result.orphans == []
    assert result.temporaries == []
    assert result.hangs == []
    assert result.differences == []

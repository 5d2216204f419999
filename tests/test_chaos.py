"""Chaos per stage (tests/chaos.py): SIGKILLs of random processes of a stage at random moments (the
driver, a pool worker, its guard, the resource tracker, a DataLoader worker), then nothing of the
killed run left, and the same command's outputs those of an uninterrupted run, byte for byte (the
training stage: exported weights and every logged loss). One round of up to three kills per stage
here, seeded: the kill schedule is printed, and a failure is hunted further with
``python benchmarks/chaos.py --stage S --rounds N --seed K``.

Here: encode (a local pool: workers, guards, the resource tracker), download (img2dataset in the
workers) and train (DataLoader workers). Caption, generate and train-vae run in the benchmark
only: each of their runs loads models in every process (train-vae: seconds a step), and three
runs of each (uninterrupted, killed, rerun) would take minutes of the suite's time; their
processes are those of encode's pool and train's loader.
"""

from __future__ import annotations

import pytest

from .chaos import chaos, stage

# the fixtures each stage's inputs come from (tests/conftest.py), by the name tests/chaos.py gives them
NEEDS = {"encode": {"vae": "vae_path"}, "download": {"server": "server"}, "train": {"data": "data"}}
SEED = 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEEDS))
def test_a_stage_killed_at_random_leaves_nothing_and_finishes_with_the_same_outputs(name, tmp_path, request):
    files = {key: request.getfixturevalue(fixture) for key, fixture in NEEDS[name].items()}
    result = chaos(stage(name, str(tmp_path / "inputs"), files), str(tmp_path), rounds=1, seed=SEED)
    assert result.kills >= 1
    assert result.orphans == []
    assert result.temporaries == []
    assert result.differences == []

"""`lverse pipeline run`: download -> tokenizer -> encode on a local Ray, resumable by stage."""

import json
import os

import pytest
import torch
import yaml

from lverse.cli import main
from lverse.model import AugVAE, save_model
from lverse.model.augvae import PRESETS
from lverse.preprocessing.synthetic_server import SyntheticServer, SyntheticSet


@pytest.mark.slow
def test_pipeline_runs_each_stage_once(tmp_path):
    torch.manual_seed(0)
    vae = str(tmp_path / "vae.safetensors")
    save_model(AugVAE(PRESETS["debug-sl"]), vae)
    with SyntheticServer(SyntheticSet(seed=2, train=16, heldout=2, image_size=64)) as server:
        tsv = server.write_tsv(str(tmp_path / "in"), bad_urls=False)["train"]
        config = tmp_path / "pipeline.yaml"
        config.write_text(yaml.safe_dump({
            "run_dir": str(tmp_path / "run"),
            "download": {"input": tsv, "samples_per_shard": 8, "image_size": 64, "timeout": 5, "download_threads": 8},
            "tokenizer": {"vocab_size": 60},
            "encode": {"vae": vae, "batch_size": 4}}))
        assert main(["pipeline", "run", str(config)]) == 0
        run = tmp_path / "run"
        assert sorted(os.listdir(run / "_done")) == ["download.json", "encode.json", "tokenizer.json"]
        assert json.load(open(run / "_done" / "download.json"))["written"] == 16
        assert (run / "tokenizer.model").is_file() and (run / "config.yaml").is_file()
        assert sorted(p for p in os.listdir(run / "tokens") if p.endswith(".tar")) == ["00000.tar", "00001.tar"]
        assert json.load(open(run / "tokens" / "_summary.json"))["samples"] == 16

        requests = sum(server.requests.values())
        mtime = os.path.getmtime(run / "tokens" / "00000.tar")
        assert main(["pipeline", "run", str(config)]) == 0  # every stage done: nothing runs
        assert sum(server.requests.values()) == requests
        assert os.path.getmtime(run / "tokens" / "00000.tar") == mtime


def test_config_mistakes_are_named(tmp_path, caplog):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path), "tokeniser": {"vocab_size": 10}}))
    assert main(["pipeline", "run", str(config)]) == 2
    assert "unknown keys ['tokeniser']" in caplog.text
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path), "download": {"input": "x", "samples": 3}}))
    assert main(["pipeline", "run", str(config)]) == 2
    assert "samples" in caplog.text and "known keys" in caplog.text
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path), "download": {"input": "x", "output": "y"},
                                      "encode": {"vae": "v"}}))
    assert main(["pipeline", "run", str(config)]) == 2
    assert "set by the pipeline" in caplog.text

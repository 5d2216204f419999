"""`lverse pipeline run`'s config checks. The pipeline itself (download -> tokenizer -> encode on
Ray, each stage once) runs on the `ray up` cluster of tests/test_ray_cluster.py."""

import yaml

from lverse.cli import main


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

import subprocess
import sys

import pytest

from lverse.cli import build_parser, main
from lverse.model.augvae import PRESETS, AugVAE
from lverse.model.checkpoint import save_model


def test_every_subcommand_explains_itself(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"tokenizer", "convert-vae", "download", "encode", "pipeline", "synthetic", "demo"} <= set(commands)
    for name, sub in commands.items():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert sub.description and len(sub.description) > 60, f"{name} needs a description"
        assert all(a.help for a in sub._actions), f"every option of {name} explains itself"
        assert out.startswith(f"usage: lverse {name}")


def test_console_entry_point():
    out = subprocess.run([sys.executable, "-m", "lverse.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "tokenizer" in out.stdout


def test_tokenizer_command(tmp_path):
    captions = tmp_path / "cc.tsv"
    captions.write_text("".join(f"a {c} square number {i}\thttp://x/{i}.jpg\n"
                                for i in range(50) for c in ("red", "blue")))
    assert main(["tokenizer", "--captions", str(captions), "--output", str(tmp_path / "tok"),
                 "--vocab-size", "40"]) == 0
    assert (tmp_path / "tok.model").is_file()


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "--captions", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "t")])
    assert e.value.code == 2 and "is not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tokenizer", "--captions", __file__, "--output", "t", "--vocab-size", "0"])
    assert not list(tmp_path.iterdir())


def test_convert_vae_ml_to_sl(tmp_path):
    ml_path, sl_path = tmp_path / "ml.safetensors", tmp_path / "sl.safetensors"
    save_model(AugVAE(PRESETS["debug-ml"]), str(ml_path))
    assert main(["convert-vae", "--input", str(ml_path), "--output", str(sl_path), "--to-sl"]) == 0
    sl = AugVAE.from_pretrained(str(sl_path))
    assert sl.cfg.variant == "sl" and sl.cfg.num_tokens == 64
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("not a checkpoint")
    assert main(["convert-vae", "--input", str(bogus), "--output", str(tmp_path / "x.safetensors")]) == 2



def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 3e-4 as a string; the config loader turns it into the number
    from lverse.core.config import load_config
    from lverse.pipeline.train import TrainConfig
    path = tmp_path / "run.yaml"
    path.write_text("steps: 1e3\npeak_flops: 989e12\noptim:\n  lr: 3e-4\n")
    cfg = load_config(str(path), TrainConfig)
    assert cfg.optim.lr == 3e-4 and cfg.peak_flops == 989e12 and cfg.steps == 1000 and isinstance(cfg.steps, int)
    path.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ValueError, match=r"optim.lr: expected a number, got 'fast'"):
        load_config(str(path), TrainConfig)

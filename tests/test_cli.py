import argparse
import os
import subprocess
import sys
import time
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

import pytest
import torch
import yaml

from lverse.cli import COMMANDS, Command, DemoBelowTarget, build_parser, main
from lverse.core.config import add_options, field_help, flag, options_to_config
from lverse.core.errors import InputError
from lverse.model.augvae import PRESETS, AugVAE
from lverse.model.biart import PRESETS as BIART_PRESETS
from lverse.model.biart import BiART, BiARTConfig
from lverse.model.checkpoint import save_model
from lverse.pipeline.configs import EncodeConfig
from lverse.pipeline.encode import run_encode
from lverse.preprocessing.text_tokenizer import CaptionTokenizer
from lverse.runtime.lifetime import OWNER, _identity
from lverse.runtime.tasks import StageFailed

from .test_encode import raw_shards
from .test_train import train_config


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


def test_help_imports_no_torch_deepspeed_or_ray():
    """Every command's options come from light modules, so help answers at once (benchmarks/cli.py
    times it)."""
    code = ("import sys\nfrom lverse.cli import main\n"
            "for argv in (['--help'], ['caption', '--help'], ['train', '--help'], ['evaluate', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'deepspeed', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("heavy: []"), out.stdout[-300:]


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
    from lverse.pipeline.configs import TrainConfig
    path = tmp_path / "run.yaml"
    path.write_text("steps: 1e3\npeak_flops: 989e12\noptim:\n  lr: 3e-4\n")
    cfg = load_config(str(path), TrainConfig)
    assert cfg.optim.lr == 3e-4 and cfg.peak_flops == 989e12 and cfg.steps == 1000 and isinstance(cfg.steps, int)
    path.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ValueError, match=r"optim.lr: expected a number, got 'fast'"):
        load_config(str(path), TrainConfig)


# -- options made from the config dataclasses ----------------------------------------------------

def _file(tmp_path, name="f"):
    path = tmp_path / name
    path.write_text("x")
    return str(path)


def required_arguments(cmd: Command, file: str, empty_yaml: str) -> tuple[list[str], dict]:
    """The arguments a command cannot go without (a Literal's first choice, else an existing file)
    and the fields they set."""
    hints = typing.get_type_hints(cmd.options)
    values = {f.name: (typing.get_args(hints[f.name]) or (file,))[0] for f in fields(cmd.options)
              if f.default is MISSING and f.default_factory is MISSING}
    argv = [values[name] for name in cmd.positional]
    argv += [x for name, value in values.items() if name not in cmd.positional for x in (flag(name), value)]
    return argv + (["--config", empty_yaml] if cmd.config_file == "required" else []), values


def test_every_option_comes_from_its_dataclass_which_alone_holds_the_defaults(tmp_path):
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    assert set(COMMANDS) == set(subparsers)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    for name, cmd in COMMANDS.items():
        argv, values = required_arguments(cmd, _file(tmp_path), str(empty))
        config = cmd.config(parser.parse_args([name, *argv]))
        assert config == cmd.options(**values), f"{name}: a default differs from {cmd.options.__name__}'s"
        names = {f.name for f in fields(cmd.options)} - set(cmd.skip)
        actions = {a.dest: a for a in subparsers[name]._actions if a.dest in names}
        assert set(actions) == names, f"{name}: a field has no option"
        for f in fields(cmd.options):
            if f.name in actions:
                action = actions[f.name]
                assert action.default is argparse.SUPPRESS  # the dataclass alone holds defaults
                if f.default not in (MISSING, None) and not isinstance(f.default, bool):
                    assert action.help.endswith(f"(default: {f.default})"), (name, f.name, action.help)


def test_caption_options_override_its_config_file(tmp_path, monkeypatch):
    import lverse.pipeline.caption as caption
    seen = []
    monkeypatch.setattr(caption, "run_caption", lambda cfg: seen.append(cfg) or {})
    f = _file(tmp_path)
    config = tmp_path / "caption.yaml"
    config.write_text(yaml.safe_dump({"shards": "s", "checkpoint": f, "vae": f, "tokenizer": f, "output": "o",
                                      "candidates": 8, "max_tokens": 4}))
    assert main(["caption", "--config", str(config), "--max-tokens", "5", "--task-index", "1",
                 "--num-tasks", "2"]) == 0
    assert (seen[0].candidates, seen[0].max_tokens, seen[0].task_index, seen[0].num_tasks) == (8, 5, 1, 2)
    assert main(["caption", "--shards", "s", "--output", "o"]) == 2  # no config: the models are missing


def test_one_executor_option_and_old_options_are_refused(tmp_path, monkeypatch, caplog):
    import lverse.pipeline.encode as encode
    seen = []
    monkeypatch.setattr(encode, "run_encode", lambda cfg: seen.append(cfg) or {})
    base = ["encode", "--shards", "s", "--vae", _file(tmp_path), "--output", "o"]
    assert main([*base, "--executor", "ray", "--ray-address", "auto"]) == 0
    assert (seen[0].executor, seen[0].ray_address, seen[0].workers) == ("ray", "auto", None)
    assert main([*base, "--ray-address", "auto"]) == 2 and "--executor ray" in caplog.text
    assert len(seen) == 1
    for old in (["--ray"], ["--executor", "dask"]):
        with pytest.raises(SystemExit) as e:
            main([*base, *old])
        assert e.value.code == 2
    download = ["download", "--input", _file(tmp_path), "--output", "o"]
    for old in (["--threads", "4"], ["--format", "cc3m"], ["--distributor", "ray"]):
        with pytest.raises(SystemExit) as e:
            main([*download, *old])
        assert e.value.code == 2


@dataclass
class Toy:
    name: str  # the name; 100% required
    # a comment above the field
    # on two lines
    size: int | None = None
    mode: Literal["a", "b"] = "a"  # which mode
    fast: bool = False  # go fast
    check: bool = True  # check things
    ratio: float = 0.5


def test_add_options_reads_types_defaults_and_comments():
    parser = argparse.ArgumentParser(prog="toy")
    add_options(parser, Toy)
    assert "100% required" in parser.format_help()
    args = parser.parse_args(["--name", "n", "--size", "3", "--mode", "b", "--fast", "--no-check"])
    assert options_to_config(Toy, args) == Toy("n", 3, "b", True, False)
    assert options_to_config(Toy, parser.parse_args(["--name", "n"])) == Toy("n")
    assert field_help(Toy)["size"] == "a comment above the field on two lines" and "ratio" not in field_help(Toy)
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "n", "--mode", "c"])
    with pytest.raises(InputError, match="missing --name"):
        options_to_config(Toy, argparse.Namespace())

    @dataclass
    class Nested:
        toy: Toy
        extra: dict = field(default_factory=dict)
    with pytest.raises(TypeError, match="Nested.toy .* cannot be a command-line option"):
        add_options(argparse.ArgumentParser(), Nested)
    add_options(argparse.ArgumentParser(), Nested, skip=("toy", "extra"))


# -- exit status: bad input is one line and 2; a bug is a traceback --------------------------------

@pytest.mark.parametrize("error, status", [(InputError, 2), (FileNotFoundError, 2), (StageFailed, 1),
                                           (DemoBelowTarget, 1)])
def test_expected_errors_are_one_line_and_an_exit_status(error, status, tmp_path, monkeypatch, capsys, caplog):
    import lverse.pipeline.report as report

    def broken(*args, **kwargs):
        raise error("what to change")
    monkeypatch.setattr(report, "write_report", broken)
    assert main(["report", str(tmp_path)]) == status
    assert "what to change" in caplog.text and "Traceback" not in capsys.readouterr().err
    assert all(r.exc_info is None for r in caplog.records)


def test_a_bug_propagates_with_its_traceback(tmp_path, monkeypatch):
    import lverse.pipeline.report as report

    def broken(*args, **kwargs):
        raise ValueError("a bug, not bad input")
    monkeypatch.setattr(report, "write_report", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["report", str(tmp_path)])


@pytest.mark.parametrize("error, status, traceback", [("ValueError", 1, True), ("InputError", 2, False)])
def test_the_console_shows_a_traceback_only_for_bugs(error, status, traceback, tmp_path):
    code = ("import sys\nimport lverse.pipeline.report as r\nfrom lverse.core.errors import InputError\n"
            f"def broken(*a, **k): raise {error}('the message')\n"
            f"r.write_report = broken\nsys.argv = ['lverse', 'report', {str(tmp_path)!r}]\n"
            "from lverse.cli import run\nrun()")  # as the `lverse` command runs
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == status and "the message" in out.stderr
    assert ("Traceback" in out.stderr) == traceback, out.stderr


# -- a path that cannot serve: one line naming it and exit status 2, through the real command ------

LVERSE = os.path.join(os.path.dirname(sys.executable), "lverse")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Real inputs, so that each command gets as far as writing its output: a debug AugVAE and
    BiART, a caption tokenizer, an image shard and its token shard, prompts, a file and a folder."""
    root = tmp_path_factory.mktemp("inputs")
    raw = raw_shards(str(root / "raw"), count=1, n=12)
    torch.manual_seed(0)
    vae = str(root / "vae.safetensors")
    save_model(AugVAE(PRESETS["debug-sl"]), vae)
    run_encode(EncodeConfig(shards=raw, vae=vae, output=str(root / "tokens"), workers=0))
    (root / "captions.txt").write_text("".join(f"a {c} square number {i}\n" for i in range(30)
                                               for c in ("red", "blue")))
    tok = CaptionTokenizer.fit(open(root / "captions.txt").read().splitlines(), str(root / "tok"), vocab_size=40,
                               offset=512)
    biart = str(root / "biart.safetensors")
    save_model(BiART(BiARTConfig(**{**BIART_PRESETS["debug"].__dict__, "text_vocab": tok.vocab_size,
                                    "text_len": 24})), biart)
    (root / "prompts.txt").write_text("a red square\n")
    (root / "a_file.txt").write_text("x")
    (root / "a_folder").mkdir()
    return {"root": root, "raw": raw, "tokens": str(root / "tokens"), "vae": vae, "tokenizer": tok.model_path,
            "checkpoint": biart, "prompts": str(root / "prompts.txt"), "file": str(root / "a_file.txt"),
            "folder": str(root / "a_folder")}


def lverse(*argv, tmpfs=None):
    """Run the ``lverse`` console script; with ``tmpfs`` (folder, mount options), in a mount
    namespace of its own where a tmpfs is mounted on that folder: the mount ends with the command,
    whatever becomes of the test (tests run as root, and root writes through permission bits, so a
    read-only mount is what refuses it)."""
    cmd = [LVERSE, *argv]
    if tmpfs:
        cmd = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o "$0" tmpfs "$1" && shift && exec "$@"',
               tmpfs[1], tmpfs[0], *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def assert_one_line_naming(out, path):
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(errors) == 1 and path in errors[0], out.stderr[-3000:]


def _train_yaml(path, inputs, run_dir):
    # no loader processes to start before the run folder is made
    return train_config(path, inputs, run_dir, data={"workers": 0})


@pytest.mark.parametrize("case", ["encode into a file", "encode under a file", "caption into a file",
                                  "generate into a file", "train in a file", "a model into a folder"])
def test_an_output_of_the_wrong_kind_is_one_line_naming_it(case, inputs, tmp_path):
    i = inputs
    models = ["--checkpoint", i["checkpoint"], "--vae", i["vae"], "--tokenizer", i["tokenizer"],
              "--clip", "lverse-tiny"]
    argv, named = {
        "encode into a file": lambda: (["encode", "--shards", i["raw"], "--vae", i["vae"], "--output", i["file"]],
                                       i["file"]),
        "encode under a file": lambda: (["encode", "--shards", i["raw"], "--vae", i["vae"],
                                         "--output", i["file"] + "/sub"], i["file"]),
        "caption into a file": lambda: (["caption", "--shards", i["tokens"], *models, "--output", i["file"]],
                                        i["file"]),
        "generate into a file": lambda: (["generate", "--prompts", i["prompts"], *models, "--output", i["file"]],
                                         i["file"]),
        "train in a file": lambda: (["train", "--config", _train_yaml(tmp_path / "train.yaml", i, i["file"])],
                                    i["file"]),
        # what `lverse export RUN OUT` does with OUT: both write with save_model
        "a model into a folder": lambda: (["convert-vae", "--input", i["vae"], "--output", i["folder"]],
                                          i["folder"]),
    }[case]()
    assert_one_line_naming(lverse(*argv), named)
    assert os.listdir(i["folder"]) == [] and not [n for n in os.listdir(i["root"]) if n.endswith(".tmp")]


@pytest.mark.parametrize("case", ["download", "convert-vae"])
def test_a_read_only_output_folder_is_one_line_naming_it(case, inputs, tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("a red square\thttp://127.0.0.1:9/x.jpg\n")
    argv = {"download": ["download", "--input", str(tsv), "--output", str(folder)],
            # the file goes to a temporary name first: the folder is named, not that name
            "convert-vae": ["convert-vae", "--input", inputs["vae"], "--output", str(folder / "x.safetensors")]}[case]
    assert_one_line_naming(lverse(*argv, tmpfs=(str(folder), "ro,size=1m")), str(folder))


def test_a_full_disk_mid_work_is_one_line_and_status_1(inputs, tmp_path):
    """ENOSPC is the storage failing, not a path to change (status 1, not 2), but it is said in one
    line: what is full and that the same command goes on once there is room."""
    folder = tmp_path / "small"
    folder.mkdir()
    out = lverse("convert-vae", "--input", inputs["vae"], "--output", str(folder / "x.safetensors"),
                 tmpfs=(str(folder), "size=1m"))  # the AugVAE is larger
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-3000:]
    assert "No space left on device" in errors[0] and "run the same command again" in errors[0], errors


def test_the_command_ends_after_joining_threads_and_running_exit_handlers_without_teardown():
    """``exit_now`` (its doc says why): the exit code, a thread still working finishes, the atexit
    handlers run after it, and no object is finalised by the interpreter's teardown."""
    script = ("import atexit, threading, time\nfrom lverse.cli import exit_now\n"
              "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done', flush=True))).start()\n"
              "atexit.register(lambda: print('atexit ran'))\n"
              "class Late:\n    def __del__(self):\n        print('finalised')\n"
              "late = Late()\nexit_now(3)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert out.stdout.split("\n") == ["thread done", "atexit ran", ""]


def test_the_command_ends_its_daemonic_children_even_one_that_ignores_sigterm():
    """A DataLoader worker ignores SIGTERM, and Python's exit would wait for it forever after
    sending one: a training run that failed hung (exit_now's doc)."""
    script = ("import multiprocessing, signal, time\nfrom lverse.cli import exit_now\n"
              "def deaf():\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    time.sleep(600)\n"
              "if __name__ == '__main__':\n"
              "    child = multiprocessing.get_context('fork').Process(target=deaf, daemon=True)\n"
              "    child.start()\n    time.sleep(0.5)\n    print(child.pid, flush=True)\n    exit_now(4)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 4, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    child, deadline = int(out.stdout), time.time() + 10
    while time.time() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # killed, not reaped yet
                    break
        except FileNotFoundError:  # killed and reaped
            break
        time.sleep(0.1)
    assert time.time() < deadline, f"the daemonic child {child} outlived the command"


def test_a_command_keeps_its_temporary_files_in_a_folder_it_removes_and_removes_those_of_killed_commands(tmp_path):
    """Every temporary file of a command's processes goes into a folder of the command, removed at
    its end (what a stage leaves there after a signal or at its end: tests/test_stop.py); the
    folder of a command that was SIGKILLed is removed by the next command, unless its owner is
    still running, on another machine or in another PID namespace (runtime/lifetime.py
    ``own_temporary_folder``)."""
    system = tmp_path / "tmp"
    system.mkdir()
    ended = subprocess.Popen(["sleep", "0.5"])
    alive = subprocess.Popen(["sleep", "60"])
    try:
        boot, namespace, pid, start = _identity(ended.pid).split()
        owners = {"ended": _identity(ended.pid), "alive": _identity(alive.pid), "no owner": None,
                  "other machine": f"another-boot {namespace} {pid} {start}",
                  "other namespace": f"{boot} pid:[1] {pid} {start}"}
        ended.wait()
        for name, owner in owners.items():
            (system / f"lverse-{name}").mkdir()
            if owner is not None:
                (system / f"lverse-{name}" / OWNER).write_text(owner)
        script = ("import atexit, sys, tempfile\nfrom lverse.cli import run\n"
                  "atexit.register(lambda: print('temporary folder', tempfile.gettempdir()))\n"
                  "sys.argv[1:] = ['index', '--help']\nrun()\n")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, TMPDIR=str(system)))
    finally:
        alive.kill()
        alive.wait()
    assert out.returncode == 0, out.stderr
    assert f"temporary folder {system}/lverse-" in out.stdout  # its own, inside TMPDIR
    assert sorted(os.listdir(system)) == ["lverse-alive", "lverse-no owner", "lverse-other machine",
                                          "lverse-other namespace"]

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lverse.core.errors import InputError
from lverse.model.augvae import PRESETS as VAE_PRESETS
from lverse.model.augvae import AugVAE
from lverse.model.biart import PRESETS as BIART_PRESETS
from lverse.model.biart import BiART, BiARTConfig, Direction, build_sequence
from lverse.model.checkpoint import load_model, save_model


def test_augvae_round_trip(tmp_path):
    vae = AugVAE(VAE_PRESETS["debug-sl"])
    vae.train()(torch.rand(2, 3, 64, 64) * 2 - 1)  # move the codebook buffers off their init
    path = tmp_path / "vae.safetensors"
    save_model(vae, str(path))
    loaded = AugVAE.from_pretrained(str(path)).eval()
    assert loaded.cfg == vae.cfg
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert [p.name for p in tmp_path.iterdir()] == ["vae.safetensors"], "no temporary file left"


def test_biart_round_trip(tmp_path):
    model = BiART(BIART_PRESETS["debug"]).eval()
    path = tmp_path / "biart.safetensors"
    save_model(model, str(path))
    loaded = load_model(str(path), BiART, BiARTConfig).eval()
    seq = build_sequence(torch.full((1, 16), 600), torch.zeros(1, 64, dtype=torch.long), Direction.T2I, model.cfg)
    assert torch.equal(loaded(seq[:, :-1], Direction.T2I)[0], model(seq[:, :-1], Direction.T2I)[0])


def test_files_without_our_config_are_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="no lverse config"):
        AugVAE.from_pretrained(str(path))
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "1", "config": json.dumps({"bogus": 1})})
    with pytest.raises(ValueError, match=r"unknown fields \['bogus'\]"):
        AugVAE.from_pretrained(str(path))


def test_a_model_file_of_no_format_or_of_another_config_is_refused(tmp_path):
    """A model file records its format (one version, core/formats.py) and its whole config: one that
    records no format, or whose config lacks a field, is refused with what writes it again."""
    from safetensors.torch import load_file
    path = str(tmp_path / "biart.safetensors")
    save_model(BiART(BIART_PRESETS["debug"]), path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "1"
    save_file(load_file(path), path, metadata={k: v for k, v in meta.items() if k != "format"})
    with pytest.raises(ValueError, match=r"records no format version; .*`lverse export RUN_DIR`"):
        load_model(path, BiART, BiARTConfig)
    config = json.loads(meta["config"])
    del config["pad_vocab_to"]
    save_file(load_file(path), path, metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(ValueError, match=r"not match BiARTConfig \(unknown fields \[\], missing \['pad_vocab_to'\]"):
        load_model(path, BiART, BiARTConfig)


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "biart.safetensors"
    save_model(BiART(BIART_PRESETS["debug"]), str(path))
    with pytest.raises(ValueError):
        load_model(str(path), AugVAE, type(VAE_PRESETS["debug-sl"]))


def test_provenance_round_trips_and_a_model_without_it_is_let_through_with_a_warning(tmp_path, caplog):
    from lverse.model.checkpoint import check_provenance, provenance_of, read_provenance
    vae, tok = tmp_path / "vae.bin", tmp_path / "tok.model"
    vae.write_bytes(b"an augvae")
    tok.write_bytes(b"a tokenizer")
    record = provenance_of(str(vae), str(tok))
    save_model(BiART(BIART_PRESETS["debug"]), str(tmp_path / "with.safetensors"), record)
    save_model(BiART(BIART_PRESETS["debug"]), str(tmp_path / "without.safetensors"))
    assert read_provenance(str(tmp_path / "with.safetensors")) == record
    assert read_provenance(str(tmp_path / "without.safetensors")) is None
    check_provenance(record, str(vae), str(tok), "m", "--x")  # the same files pass
    with caplog.at_level("WARNING"):
        check_provenance(None, str(vae), str(tok), "old.safetensors", "--x")
    assert "old.safetensors records no AugVAE or tokenizer hash" in caplog.text
    tok.write_bytes(b"another tokenizer")
    with pytest.raises(InputError, match=r"^tokenizer .*tok.model has sha256 .* m was trained with .*\(--x to use"):
        check_provenance(record, str(vae), str(tok), "m", "--x")

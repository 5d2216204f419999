"""BiART's output head (model/head.py): the restricted head's loss is the log-likelihood under the
softmax over each target's modality; the chunked loss equals the plain one, values and gradients;
lm_head padding is never sampled nor scored, and files load across paddings."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lverse.model.biart import PRESETS, BiART, BiARTConfig, Direction, build_sequence

from .test_biart import batch

CFG = dataclasses.replace(PRESETS["debug"], embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)


def losses_and_grads(model, seq, direction, **kw):
    model.zero_grad()
    _, losses = model(seq[:, :-1], direction, targets=seq[:, 1:], **kw)
    losses["loss"].backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("head", ["restricted", "full"])
@pytest.mark.parametrize("pad", [1, 64])
def test_chunked_loss_equals_the_plain_path_values_and_gradients(head, pad, direction):
    """7 positions a chunk: every part ends in a partial chunk."""
    cfg = dataclasses.replace(CFG, head=head, pad_vocab_to=pad, loss_chunk=7)
    torch.manual_seed(0)
    model = BiART(cfg).train()
    seq = build_sequence(*batch(cfg), direction, cfg)
    plain = losses_and_grads(model, seq, direction, return_logits=True)
    chunked = losses_and_grads(model, seq, direction)
    assert model(seq[:, :-1], direction, targets=seq[:, 1:])[0] is None, "training skips the logits"
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-6)
    for name, g in plain[1].items():  # fp32 sums in another order: 1e-6 of the gradient's scale
        torch.testing.assert_close(chunked[1][name], g, rtol=0, atol=1e-5 * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("head", ["restricted", "full"])
def test_chunked_loss_in_bf16_is_the_plain_path_within_bf16_rounding(head):
    cfg = dataclasses.replace(CFG, head=head, loss_chunk=16)
    torch.manual_seed(0)
    model = BiART(cfg).train()
    seq = build_sequence(*batch(cfg), Direction.T2I, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = losses_and_grads(model, seq, Direction.T2I, return_logits=True)
        chunked = losses_and_grads(model, seq, Direction.T2I)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-2, atol=1e-2)
    for name, g in plain[1].items():  # relative to the gradient's scale: bf16 keeps 8 bits
        torch.testing.assert_close(chunked[1][name], g, rtol=0, atol=2e-2 * g.abs().max().item() + 1e-8, msg=name)
    model_bf16 = BiART(cfg).to(torch.bfloat16).train()  # DeepSpeed's bf16: the weights themselves in bf16
    plain, chunked = (losses_and_grads(model_bf16, seq, Direction.I2T, return_logits=r) for r in (True, None))
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("direction", list(Direction))
def test_restricted_loss_is_the_likelihood_under_each_modalitys_softmax(direction):
    """From the full logits by hand: image targets over the image codes, text targets over the
    pieces and PAD; the full head is the softmax over the whole vocabulary."""
    torch.manual_seed(0)
    full = BiART(dataclasses.replace(CFG, head="full")).eval()
    restricted = BiART(CFG).eval()
    restricted.load_state_dict(full.state_dict())
    seq = build_sequence(*batch(CFG), direction, CFG)
    targets = seq[:, 1:]
    logits = full(seq[:, :-1], direction, targets=targets)[0]
    text, image = (slice(a - 1, b - 1) for a, b in (CFG.spans(direction)["text"], CFG.spans(direction)["image"]))
    is_pad = targets[:, text] == CFG.pad_id
    text_mask = (is_pad.cumsum(1) - is_pad.long()) == 0

    def expected(lo: int, hi: int, whole_vocab: bool) -> dict:
        out = {}
        for part, span, mask in (("text", text, text_mask), ("image", image, torch.ones_like(targets[:, image]))):
            a, b = (0, CFG.vocab_size) if whole_vocab else (CFG.text_offset, CFG.pad_id + 1) if part == "text" \
                else (0, CFG.image_vocab)
            nll = F.cross_entropy(logits[:, span, a:b].flatten(0, 1), (targets[:, span] - a).flatten(),
                                  reduction="none")
            out[part] = (nll * mask.flatten()).sum() / mask.sum()
        ref, gen = ("text", "image") if direction == Direction.T2I else ("image", "text")
        return {"loss": out[ref] + out[gen], "ref": out[ref], "gen": out[gen]}

    torch.testing.assert_close(full(seq[:, :-1], direction, targets=targets)[1], expected(0, 0, True))
    torch.testing.assert_close(restricted(seq[:, :-1], direction, targets=targets)[1], expected(0, 0, False))
    torch.testing.assert_close(restricted.train()(seq[:, :-1], direction, targets=targets)[1], expected(0, 0, False))


def test_padding_rows_are_never_sampled_nor_scored_and_files_load_both_ways(tmp_path):
    from lverse.model.checkpoint import load_model, save_model
    torch.manual_seed(0)
    plain = BiART(CFG).eval()
    padded = BiART(dataclasses.replace(CFG, pad_vocab_to=128)).eval()
    assert padded.lm_head.weight.shape[0] == 896 and padded.wte.weight.shape[0] == CFG.vocab_size == 771
    padded.load_state_dict(plain.state_dict())  # unpadded -> padded: zero rows appended
    with torch.no_grad():
        padded.lm_head.weight[CFG.vocab_size:] = 1e4  # padding that would win every softmax it were in
    for head in ("restricted", "full"):
        a, b = (BiART(dataclasses.replace(m.cfg, head=head)).eval() for m in (plain, padded))
        a.load_state_dict(plain.state_dict())
        b.load_state_dict(padded.state_dict())
        for d in Direction:
            seq = build_sequence(*batch(CFG), d, CFG)
            la, lb = a(seq[:, :-1], d, targets=seq[:, 1:]), b(seq[:, :-1], d, targets=seq[:, 1:])
            torch.testing.assert_close(lb, la)
            lb_train = b.train()(seq[:, :-1], d, targets=seq[:, 1:])[1]
            torch.testing.assert_close(lb_train, la[1])
            b.eval()
            assert b(seq[:, :5], d)[0].shape == (3, 1, CFG.vocab_size)
    path = str(tmp_path / "padded.safetensors")
    save_model(padded, path)
    assert load_model(path, BiART, BiARTConfig).lm_head.weight.shape[0] == 896
    back = BiART(CFG)
    back.load_state_dict(padded.state_dict())  # padded -> unpadded: the padding rows cut off
    assert torch.equal(back.lm_head.weight, plain.lm_head.weight)


def test_head_options_are_checked():
    with pytest.raises(ValueError, match="head must be"):
        BiARTConfig(head="image")
    with pytest.raises(ValueError, match="pad_vocab_to"):
        BiARTConfig(pad_vocab_to=0)

import dataclasses

import pytest
import torch

from lverse.model.biart import PRESETS, BiART, BiARTConfig, Direction, build_sequence, prompt_for, sample_next

CFG = PRESETS["debug"]


def batch(cfg=CFG, B=3, text_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(cfg.text_offset, cfg.pad_id, (B, cfg.text_len), generator=g)
    text[:, text_len:] = cfg.pad_id
    image = torch.randint(0, cfg.image_vocab, (B, cfg.image_len), generator=g)
    return text, image


def test_vocabulary_layout_is_derived_from_the_config():
    cfg = BiARTConfig(image_vocab=100, text_vocab=50, text_len=4, image_len=9)
    assert (cfg.text_offset, cfg.pad_id, cfg.soc_id, cfg.soi_id, cfg.vocab_size) == (100, 150, 151, 152, 153)
    assert cfg.seq_len == 15
    paper = PRESETS["biart-500m"]
    assert (paper.pad_id, paper.soc_id, paper.soi_id, paper.vocab_size) == (58000, 58001, 58002, 58003)


def test_sequences_of_both_directions():
    text, image = batch()
    t2i = build_sequence(text, image, Direction.T2I, CFG)
    i2t = build_sequence(text, image, Direction.I2T, CFG)
    assert t2i.shape == i2t.shape == (3, CFG.seq_len)
    assert (t2i[:, 0] == CFG.soc_id).all() and (t2i[:, CFG.text_len + 1] == CFG.soi_id).all()
    assert (i2t[:, 0] == CFG.soi_id).all() and (i2t[:, CFG.image_len + 1] == CFG.soc_id).all()
    for d, seq in ((Direction.T2I, t2i), (Direction.I2T, i2t)):
        (ta, tb), (ia, ib) = CFG.spans(d)["text"], CFG.spans(d)["image"]
        assert torch.equal(seq[:, ta:tb], text) and torch.equal(seq[:, ia:ib], image)
    model = BiART(CFG)
    # Image token k has the same position in both directions; segments swap.
    t_img, i_img = CFG.spans(Direction.T2I)["image"], CFG.spans(Direction.I2T)["image"]
    assert torch.equal(model.pos_ids[0, slice(*t_img)], model.pos_ids[1, slice(*i_img)])
    assert (model.seg_ids[0, slice(*t_img)] == 1).all() and (model.seg_ids[1, slice(*i_img)] == 0).all()
    assert model.seg_ids[0, CFG.text_len + 1] == 1, "SOI carries the image block's segment"
    with pytest.raises(ValueError, match="expected"):
        build_sequence(text[:, :-1], image, Direction.T2I, CFG)


@pytest.mark.parametrize("head", ["restricted", "full"])
def test_every_parameter_gets_a_gradient(head):
    model = BiART(dataclasses.replace(CFG, head=head)).train()
    text, image = batch()
    total = 0
    for d in Direction:
        seq = build_sequence(text, image, d, CFG)
        logits, losses = model(seq[:, :-1], d, targets=seq[:, 1:])
        assert logits is None, "training computes the loss in chunks, without the logits"
        assert model(seq[:, :-1], d, targets=seq[:, 1:], return_logits=True)[0].shape == \
            (3, CFG.seq_len - 1, CFG.vocab_size)
        assert all(torch.isfinite(v) for v in losses.values())
        total = total + losses["loss"]
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"



def test_activation_checkpointing_changes_memory_not_the_numbers(monkeypatch):
    """The model's own flag: blocks are recomputed in training (dropout replayed), never in eval."""
    import torch.utils.checkpoint as checkpointing
    calls = []
    monkeypatch.setattr("lverse.model.biart.checkpoint",
                        lambda *a, **kw: calls.append(1) or checkpointing.checkpoint(*a, **kw))
    text, image = batch()
    seq = build_sequence(text, image, Direction.T2I, CFG)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = BiART(dataclasses.replace(CFG, activation_checkpointing=flag)).train()
        torch.manual_seed(1)  # the same dropout masks
        _, losses = model(seq[:, :-1], Direction.T2I, targets=seq[:, 1:])
        losses["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == CFG.n_layer
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        model.eval()(seq[:, :-1], Direction.T2I)
    assert len(calls) == CFG.n_layer, "no recomputation outside training"


@pytest.mark.parametrize("direction", list(Direction))
def test_text_after_the_first_pad_is_ignored(direction):
    model = BiART(CFG).eval()
    text, image = batch(text_len=5)
    seq = build_sequence(text, image, direction, CFG)
    ref = model(seq[:, :-1], direction, targets=seq[:, 1:])[1]

    a = CFG.spans(direction)["text"][0]
    after = seq.clone()
    after[:, 1:][:, a - 1 + 6:a - 1 + CFG.text_len] = CFG.text_offset + 7  # after the first PAD
    logits = model(seq[:, :-1], direction)[0]  # same inputs: only targets change
    with torch.no_grad():
        full = model(seq[:, :-1], direction, targets=seq[:, 1:])[0]
    assert logits.shape[1] == 1 and torch.allclose(logits[:, 0], full[:, -1], atol=1e-5)
    changed = model.loss(full, after[:, 1:], direction)
    torch.testing.assert_close(changed["loss"], ref["loss"])

    first_pad = seq.clone()
    first_pad[:, 1:][:, a - 1 + 5] = CFG.text_offset + 7  # the end-of-text target itself
    assert not torch.allclose(model.loss(full, first_pad[:, 1:], direction)["loss"], ref["loss"])


def test_ref_and_gen_weights():
    text, image = batch()
    seq = build_sequence(text, image, Direction.T2I, CFG)
    torch.manual_seed(1)
    only_ref = BiART(dataclasses.replace(CFG, gen_loss_weight=0.0)).eval()
    out = only_ref(seq[:, :-1], Direction.T2I, targets=seq[:, 1:])[1]
    torch.testing.assert_close(out["loss"], out["ref"])
    assert out["gen"] > 0


@pytest.mark.parametrize("direction", list(Direction))
def test_kv_cache_generation_equals_full_recomputation(direction):
    model = BiART(CFG).eval()
    text, image = batch()
    cond, n = (text, CFG.image_len) if direction == Direction.T2I else (image, CFG.text_len)
    prompt = prompt_for(cond, direction, CFG)
    greedy = model.generate(prompt, direction, n, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, direction, n, temperature=0, use_cache=False))
    sampled = [model.generate(prompt, direction, n, temperature=1.0, top_k=40, top_p=0.95, use_cache=c,
                              generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    assert torch.equal(*sampled)
    assert sampled[0].shape == (3, n)
    # num_samples: the prompt runs once and its cache serves every sample; the same draws as
    # repeating the prompt without a cache.
    many = [model.generate(prompt, direction, n, temperature=1.0, top_k=40, use_cache=c, num_samples=4,
                           generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert torch.equal(*many) and many[0].shape == (12, n)
    assert len({tuple(r) for r in many[0][:4].tolist()}) > 1  # samples of one prompt differ


def test_generation_records_no_autograd_graph():
    """Sampling keeps no graph for a backward that never comes (it would hold every step's
    activations): every block runs with gradients off, in training mode too."""
    model = BiART(CFG)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append(torch.is_grad_enabled()))
    text, _ = batch()
    model.generate(prompt_for(text, Direction.T2I, CFG), Direction.T2I, 4, temperature=0)
    assert seen and not any(seen)


def test_the_wrong_modality_is_never_produced():
    model = BiART(CFG).eval()
    text, image = batch()
    with torch.no_grad():  # make the wrong modality (and the start tokens) overwhelmingly likely
        model.lm_head.weight[:CFG.image_vocab] *= 0
        model.lm_head.weight[CFG.text_offset:] *= 50
    out = model.generate(prompt_for(text, Direction.T2I, CFG), Direction.T2I, 16, temperature=2.0)
    assert ((out >= 0) & (out < CFG.image_vocab)).all()
    with torch.no_grad():
        model.lm_head.weight[CFG.text_offset:] *= 0
        model.lm_head.weight[:CFG.image_vocab].normal_().mul_(50)
        model.lm_head.weight[CFG.soc_id:].normal_().mul_(50)
    out = model.generate(prompt_for(image, Direction.I2T, CFG), Direction.I2T, CFG.text_len, temperature=2.0)
    assert ((out >= CFG.text_offset) & (out <= CFG.pad_id)).all()


def test_text_generation_stops_per_row_at_end_of_text():
    model = BiART(CFG).eval()
    _, image = batch(B=4)
    with torch.no_grad():  # every hidden state = e; flat text logits, PAD about 15% a step
        e = torch.ones(CFG.n_embd)
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(e)
        model.lm_head.weight.zero_()
        model.lm_head.weight[CFG.pad_id] = e * 3.8 / e.dot(e)
    out = model.generate(prompt_for(image, Direction.I2T, CFG), Direction.I2T, CFG.text_len,
                         temperature=1.0, generator=torch.Generator().manual_seed(0))
    is_pad = out == CFG.pad_id
    ends = [int(row.nonzero()[0]) if row.any() else None for row in is_pad]
    assert len(set(ends)) > 1 and any(e is not None for e in ends), f"rows should end apart: {ends}"
    after_first = is_pad.cumsum(1) > 0
    assert torch.equal(is_pad, after_first), "every token after a row's first PAD must be PAD"


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits, temperature=0).item() == 1
    assert sample_next(logits, top_k=1).item() == 1
    assert sample_next(logits, top_p=1e-6).item() == 1
    draws = {sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {1, 3}


def test_bad_generation_requests_are_refused():
    model = BiART(CFG).eval()
    text, _ = batch()
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt_for(text, Direction.T2I, CFG), Direction.T2I, CFG.image_len + 1)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(text, Direction.T2I, 4)


def test_no_weight_decay_on_embeddings_biases_and_norms():
    model = BiART(CFG)
    decay, no_decay = model.optim_groups(0.01)
    ids = {id(p) for p in decay["params"]}
    assert id(model.wte.weight) not in ids and id(model.wpe.weight) not in ids
    assert id(model.wse.weight) not in ids and id(model.ln_f.weight) not in ids
    assert id(model.lm_head.weight) in ids and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))

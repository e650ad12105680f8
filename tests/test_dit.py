"""The Kaleido DiT against diffusers' Wan transformer, the spec's layout and its own invariants."""

import math

import pytest
import torch
from diffusers import WanTransformer3DModel

from sgm.checkpoint import ENGINE_PREFIX, StateDictMismatchError, load_dit_state_dict
from sgm.convert.diffusers_wan import diffusers_config, diffusers_to_kaleido, kaleido_to_diffusers
from sgm.modules.dit import layer_norm, rms_norm, timestep_sinusoid, unpatchify
from sgm.registry import build_dit

TINY = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "inner_hidden_size": 128,
    "time_freq_dim": 32,
    "text_dim": 24,
}
B, T, C, H, W = 2, 3, 16, 8, 12


def inputs(batch=B, frames=T, height=H, width=W, text=20):
    x = torch.randn(batch, frames, C, height, width)
    timesteps = torch.tensor([137.5, 921.0][:batch])
    context = torch.randn(batch, text, TINY["text_dim"])
    return x, timesteps, context


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return build_dit(TINY).eval()


def diffusers_twin(model):
    twin = WanTransformer3DModel(**diffusers_config(model.config)).eval()
    twin.load_state_dict(kaleido_to_diffusers(model.state_dict()), strict=True)
    return twin


@pytest.mark.parametrize("timesteps", [[3.0, 17.0], [137.5, 921.0], [999.0, 1000.0]])
def test_without_subjects_equals_diffusers_wan(model, timesteps):
    x, _, context = inputs()
    t = torch.tensor(timesteps)
    twin = diffusers_twin(model)
    with torch.no_grad():
        ours = model(x, t, context)
        theirs = twin(x.transpose(1, 2), t, context).sample.transpose(1, 2)  # diffusers: [B, C, T, H, W]
    assert ours.shape == (B, T, C, H, W)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_diffusers_key_conversion_round_trips(model):
    sd = model.state_dict()
    back = diffusers_to_kaleido(kaleido_to_diffusers(sd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="extra.weight"):
        kaleido_to_diffusers({**sd, "extra.weight": torch.zeros(1)})
    partial = kaleido_to_diffusers(sd)
    del partial["blocks.1.attn1.to_k.weight"]
    with pytest.raises(KeyError, match="query_key_value"):
        diffusers_to_kaleido(partial)


def test_static_and_list_subjects_agree(model):
    x, t, context = inputs()
    subjects = torch.randn(B, 2, C, H, W)
    with torch.no_grad():
        static = model(x, t, context, subjects)
        dynamic = model(x, t, context, [subjects[:, k : k + 1] for k in range(2)])
    torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-6)


def test_subjects_condition_the_output_but_never_reach_it(model):
    x, t, context = inputs()
    subjects = torch.randn(B, 2, C, H, W)
    seen = {}
    handle = model.mixins["final_layer"].register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0].shape[1]))
    with torch.no_grad():
        base = model(x, t, context, subjects)
        changed = subjects.clone()
        changed[:, 1] += 1.0
        other = model(x, t, context, changed)
        plain = model(x, t, context)
        empty = model(x, t, context, [])
    handle.remove()
    assert base.shape == x.shape
    assert seen["tokens"] == T * (H // 2) * (W // 2)  # the head sees video tokens only
    assert (base - other).abs().max() > 1e-3  # changing one reference changes the video
    assert (base - plain).abs().max() > 1e-3
    torch.testing.assert_close(plain, empty, rtol=0, atol=0)


def test_subjects_of_their_own_size(model):
    x, t, context = inputs()
    subjects = [torch.randn(B, 1, C, 4, 6), torch.randn(B, 1, C, 10, 8)]
    with torch.no_grad():
        out = model(x, t, context, subjects)
        tokens, layout = model.embed_tokens(x, subjects)
        changed = model(x, t, context, [subjects[0], subjects[1] + 1])
        alone = model(x, t, context)
    assert layout.num_subject_tokens == (4 // 2) * (6 // 2) + (10 // 2) * (8 // 2)  # 6 + 20 patches
    assert tokens.shape[1] == layout.num_subject_tokens + x.shape[1] * (x.shape[3] // 2) * (x.shape[4] // 2)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out - changed).abs().max() > 1e-4 and (out - alone).abs().max() > 1e-4  # each subject is attended to


def test_subject_timestep_equal_to_the_sample_timestep_is_the_release(model):
    """The per-token path with the subjects at the sample's own timestep gives the shared path's numbers."""
    x, _, context = inputs()
    t = torch.full((B,), 421.0)
    subjects = torch.randn(B, 2, C, H, W)
    own = build_dit({**TINY, "subject_timestep": 421.0}).eval()
    own.load_state_dict(model.state_dict())
    with torch.no_grad():
        release = model(x, t, context, subjects)
        per_token = own(x, t, context, subjects)
        plain = own(x, t, context)
    torch.testing.assert_close(per_token, release, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain, model(x, t, context), rtol=0, atol=0)  # no subjects: no change


def test_subject_timestep_modulates_the_subjects_as_clean_latents(model):
    """Layer 0's attention input, recomputed by hand: subjects with timestep 0's shift and scale,
    the video with the sample's."""
    x, t, context = inputs()
    subjects = torch.randn(B, 1, C, H, W)
    clean = build_dit({**TINY, "subject_timestep": 0.0}).eval()
    clean.load_state_dict(model.state_dict())
    seen = {}
    layer = clean.transformer.layers[0].attention
    handle = layer.register_forward_pre_hook(lambda m, args: seen.update(a=args[0]))
    with torch.no_grad():
        out = clean(x, t, context, subjects)
        tokens, layout = clean.embed_tokens(x, subjects)
        offsets = clean.mixins["adaln_layer"].adaLN_modulations[0][0]  # [6, D]

        def shift_scale(timestep):
            emb = clean.time_embed(timestep_sinusoid(timestep, TINY["time_freq_dim"]).float())
            six = clean.adaln_projection(emb).view(-1, 6, TINY["hidden_size"]) + offsets
            return six[:, 0, None], six[:, 1, None]  # [B, 1, D]

        normed = torch.nn.functional.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
        ns = layout.num_subject_tokens
        (s0, c0), (st, ct) = shift_scale(torch.zeros(B)), shift_scale(t)
        expected = torch.cat([normed[:, :ns] * (1 + c0) + s0, normed[:, ns:] * (1 + ct) + st], dim=1)
        release = model(x, t, context, subjects)
    handle.remove()
    torch.testing.assert_close(seen["a"], expected, rtol=0, atol=1e-5)
    # it changes the prediction (weakly at this init: the outputs' init std is 0.02/sqrt(2·layers))
    assert (out - release).abs().max() > 1e-5


def test_subject_timestep_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match=r"subject_timestep 1200.0 must be in \[0, 1000\]"):
        build_dit({**TINY, "subject_timestep": 1200.0})


def test_bad_subject_shapes_are_clear_errors(model):
    x, t, context = inputs()
    with pytest.raises(ValueError, match="must match the video's H, W"):
        model(x, t, context, torch.randn(B, 1, C, 4, 4))
    with pytest.raises(ValueError, match="B=2"):
        model(x, t, context, torch.randn(1, 1, C, H, W))
    with pytest.raises(ValueError, match="one latent frame"):
        model(x, t, context, [torch.randn(B, 2, C, H, W)])
    with pytest.raises(ValueError, match="multiples"):
        model(torch.randn(B, T, C, 7, 12), t, context)


def test_timestep_sinusoid_is_cos_first_float64():
    t = torch.tensor([0.0, 250.0])
    emb = timestep_sinusoid(t, 8)
    assert emb.dtype == torch.float64
    freqs = [math.exp(-math.log(10000.0) * j / 4) for j in range(4)]
    expected = [[math.cos(250.0 * f) for f in freqs] + [math.sin(250.0 * f) for f in freqs]]
    torch.testing.assert_close(emb[1:], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert emb[0].tolist() == [1.0] * 4 + [0.0] * 4


def test_bf16_norms_round_once_after_the_float32_gain():
    x = torch.randn(3, 64).bfloat16()
    gain = (torch.rand(64) + 0.5).bfloat16()
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * gain.float()).bfloat16()
    torch.testing.assert_close(rms_norm(x, gain, 1e-6), expected, rtol=0, atol=0)
    ln = torch.nn.functional.layer_norm(xf, (64,), gain.float(), gain.float(), 1e-6).bfloat16()
    torch.testing.assert_close(layer_norm(x, gain, gain, 1e-6), ln, rtol=0, atol=0)


def test_bf16_weights_compute_in_bf16_close_to_float32(model):
    x, t, context = inputs()
    low = build_dit(TINY, dtype=torch.bfloat16, init=False).eval()
    low.load_state_dict({k: v.bfloat16() for k, v in model.state_dict().items()})
    subjects = torch.randn(B, 2, C, H, W)
    with torch.no_grad():
        ref = model(x, t, context, subjects)
        out = low(x, t, context, subjects)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_unpatchify_inverts_patchify():
    tokens = torch.randn(2, 3 * 4 * 5, 1 * 2 * 2 * 16)
    video = unpatchify(tokens, (3, 4, 5), (1, 2, 2), 16)
    assert video.shape == (2, 3, 16, 8, 10)
    # token (t, hh, ww), output index ((o*2 + p)*2 + q)*16 + c -> video[t, c, 2hh + p, 2ww + q]
    assert video[1, 2, 7, 5, 3] == tokens[1, 2 * 20 + 2 * 5 + 1, ((0 * 2 + 1) * 2 + 1) * 16 + 7]
    patches = video.view(2, 3, 16, 4, 2, 5, 2).permute(0, 1, 3, 5, 4, 6, 2).reshape(2, 60, 64)
    assert torch.equal(patches, tokens)


def test_activation_checkpointing_gives_identical_loss_and_gradients():
    x, t, context = inputs()
    subjects = torch.randn(B, 1, C, H, W)
    results = []
    for enabled in (False, True):
        torch.manual_seed(3)
        m = build_dit(TINY, checkpoint_activations=enabled)
        loss = m(x, t, context, subjects).pow(2).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_strict_loading_names_every_problem(model):
    sd = {ENGINE_PREFIX + k: v.clone() for k, v in model.state_dict().items()}
    sd["conditioner.embedders.0.model.shared.weight"] = torch.zeros(2)  # ignored
    fresh = build_dit(TINY, device="meta")
    load_dit_state_dict(fresh, sd, assign=True)
    x, t, context = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x, t, context), model(x, t, context), rtol=0, atol=0)

    del sd[ENGINE_PREFIX + "mixins.adaln_layer.key_layernorm_list.1.weight"]
    sd[ENGINE_PREFIX + "transformer.layers.0.attention.extra.weight"] = torch.zeros(3)
    sd[ENGINE_PREFIX + "mixins.final_layer.linear.bias"] = torch.zeros(65)
    with pytest.raises(StateDictMismatchError) as info:
        load_dit_state_dict(build_dit(TINY, device="meta"), sd, assign=True)
    message = str(info.value)
    assert "mixins.adaln_layer.key_layernorm_list.1.weight" in message
    assert "transformer.layers.0.attention.extra.weight" in message
    assert "mixins.final_layer.linear.bias: [65] vs [64]" in message


def test_bf16_row_parallel_bias_and_rope_follow_the_release_rounding():
    from sgm.modules.dit import linear_bias_after
    from sgm.modules.rope import apply_rope

    layer = torch.nn.Linear(64, 32).bfloat16()
    x = torch.randn(5, 64).bfloat16()
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.weight) + layer.bias  # matmul, round, add, round
        torch.testing.assert_close(linear_bias_after(x, layer), expected, rtol=0, atol=0)

    q = torch.randn(1, 6, 2, 8).bfloat16()
    angles = torch.rand(6, 4) * 6
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    x0, x1 = q[..., 0::2], q[..., 1::2]
    c, s = cos[:, None], sin[:, None]
    out = apply_rope(q, cos, sin)
    torch.testing.assert_close(out[..., 0::2], x0 * c - x1 * s, rtol=0, atol=0)
    torch.testing.assert_close(out[..., 1::2], x1 * c + x0 * s, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_bf16_forward_close_to_cpu_float32(model):
    x, t, context = inputs()
    subjects = torch.randn(B, 2, C, H, W)
    gpu = build_dit(TINY, device="cuda", dtype=torch.bfloat16, init=False).eval()
    gpu.load_state_dict({k: v.bfloat16() for k, v in model.state_dict().items()})
    with torch.no_grad():
        ref = model(x, t, context, subjects)
        out = gpu(x.cuda(), t.cuda(), context.cuda(), subjects.cuda()).float().cpu()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_init_weights_follows_the_spec_and_ignores_the_thread_count():
    """spec-dit §1.4: column linears N(0, 0.02), row linears N(0, 0.02/sqrt(2L)), their biases 0,
    patch conv and final linear Xavier-uniform, modulation offsets N(0, 1)/sqrt(D), PyTorch's default
    Linear init for the embeddings, norm gains 1; one seed gives the same weights on 1 and 2 threads."""
    import math

    from sgm.modules.dit import init_weights

    arch = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "inner_hidden_size": 512, "text_dim": 64}
    threads = torch.get_num_threads()
    models = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            model = build_dit(arch, init=False)
            init_weights(model, seed=11)
            models.append(model)
    finally:
        torch.set_num_threads(threads)
    one, two = (m.state_dict() for m in models)
    assert all(torch.equal(one[k], two[k]) for k in one)
    other = build_dit(arch, init=False)
    init_weights(other, seed=12)
    key = "transformer.layers.0.mlp.dense_h_to_4h.weight"
    assert not torch.equal(other.state_dict()[key], one[key])  # another seed, other weights

    def std_of(suffix: str) -> float:
        values = torch.cat([v.flatten() for name, v in one.items() if name.endswith(suffix)])
        assert abs(values.mean().item()) < 0.1 * values.std().item()
        return values.std().item()

    for column in (
        "query_key_value.weight",
        "cross_attention.query.weight",
        "key_value.weight",
        "dense_h_to_4h.weight",
    ):
        assert std_of(column) == pytest.approx(0.02, rel=0.03), column
    for row in ("attention.dense.weight", "cross_attention.dense.weight", "dense_4h_to_h.weight"):
        assert std_of(row) == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.03), row
    for bias in ("query_key_value.bias", "attention.dense.bias", "dense_h_to_4h.bias", "dense_4h_to_h.bias"):
        assert all(not v.any() for name, v in one.items() if name.endswith(bias))
    assert std_of("adaLN_modulations.0") == pytest.approx(1 / math.sqrt(256), rel=0.1)
    patch = one["mixins.patch_embed.proj.weight"]  # Xavier-uniform on [D, C·1·2·2]
    bound = math.sqrt(6 / (256 + 16 * 4))
    assert (
        patch.abs().max() <= bound
        and patch.abs().max() > 0.95 * bound
        and not one["mixins.patch_embed.proj.bias"].any()
    )
    final = one["mixins.final_layer.linear.weight"]  # [4·16, D]
    assert final.abs().max() <= math.sqrt(6 / (64 + 256)) and final.std() > 0.8 * math.sqrt(6 / (64 + 256)) / math.sqrt(
        3
    )
    time_in = one["time_embed.0.weight"]  # default Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert time_in.abs().max() <= 1 / math.sqrt(arch.get("time_freq_dim", 256))
    norms = [v for name, v in one.items() if "layernorm_list" in name]
    assert norms and all(torch.equal(v, torch.ones_like(v)) for v in norms)

"""Gradients through whole models: after one backward of the same loss, every parameter's gradient
summed over the sequence ranks is the sequence degree times the single-device gradient (so FSDP's
mean over data x sequence ranks is exact), in float64, for the 9 families on U2, R2 and U2xR2, with
tensor parallelism (TP2xU2), and for a sample of classes whose plans are inferred; the backward's
bytes against the closed form."""

import pytest

import model_grad_tasks

FAMILIES = ["FluxTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel",
            "ZImageTransformer2DModel", "WanTransformer3DModel", "SD3Transformer2DModel",
            "LTXVideoTransformer3DModel", "HunyuanVideoTransformer3DModel", "CogVideoXTransformer3DModel"]


@pytest.mark.parametrize("ring,ulysses", [(1, 2), (2, 1), (2, 2)], ids=["U2", "R2", "U2xR2"])
def test_family_gradients_equal_single_device(pools, ring, ulysses):
    per_rank = pools(ring * ulysses).run(model_grad_tasks.gradients, FAMILIES, ring, ulysses)
    for results in per_rank:
        assert set(results) == set(FAMILIES)
        assert all(r["params"] > 20 and r["calls"]["reduce_scatter"] > 0 for r in results.values())


def test_tensor_parallel_gradients_equal_single_device(pools):
    """TP2xU2: tp-sharded weights' local gradients equal their part of one device's; per-head norms
    (whole on every tp rank, applied to its own heads) sum their gradients over tp."""
    classes = ["FluxTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel",
               "LTXVideoTransformer3DModel", "WanTransformer3DModel"]
    per_rank = pools(4).run(model_grad_tasks.gradients, classes, 1, 2, tp=2, heads=4)
    for results in per_rank:
        assert all(r["calls"]["tp_all_reduce"] > 0 for r in results.values())


def test_gather_backward_bytes_equal_theory(pools):
    """U2, Qwen-Image: the output gather's backward reduce-scatters the padded [B, S, C] gradient
    once: (P - 1) / P of it per rank, float64."""
    (r0,), (r1,) = ([res["QwenImageTransformer2DModel"]] for res in
                    pools(2).run(model_grad_tasks.gradients, ["QwenImageTransformer2DModel"], 1, 2))
    batch, tokens, channels = 2, 3 * 5, 2 * 2 * 4  # the grid_for grid; 2x2 patches of 4 channels
    padded = batch * (2 * -(-tokens // 2)) * channels * 8
    assert r0["bytes"]["reduce_scatter"] == r1["bytes"]["reduce_scatter"] == padded // 2


# Plans inferred or converted from diffusers' own, over the kinds of attention they hold: Chroma's
# outer-product mask, HunyuanVideo 1.5's pairwise mask, Ideogram 4's segments, OmniGen's causal text,
# Qwen-Image 2.1's block-causal runs, LTX-2's whole audio queries over the sharded video.
INFERRED = ["PixArtTransformer2DModel", "ChromaTransformer2DModel", "HunyuanVideo15Transformer3DModel",
            "Ideogram4Transformer2DModel", "OmniGenTransformer2DModel", "Lumina2Transformer2DModel",
            "QwenImage21Transformer2DModel", "LTX2VideoTransformer3DModel", "AllegroTransformer3DModel"]


def test_inferred_class_gradients_equal_single_device(pools):
    per_rank = pools(4).run(model_grad_tasks.gradients, INFERRED, 2, 2)
    assert all(set(results) == set(INFERRED) for results in per_rank)


@pytest.mark.parametrize("ring,ulysses", [(1, 2), (2, 2)], ids=["U2", "U2xR2"])
def test_whole_query_gradients_equal_single_device(pools, ring, ulysses):
    cases = [dict(B=2, H=4, D=8, Sq=5, Skv=13), dict(B=1, H=4, Hk=2, D=8, Sq=6, Skv=3, mask=True),
             dict(B=2, H=2, D=8, Dv=4, Sq=7, Skv=11, mask=True)]
    per_rank = pools(ring * ulysses).run(model_grad_tasks.whole_query_gradients, ring, ulysses, cases)
    assert all(len(errors) == len(cases) for errors in per_rank)


def test_parts_without_a_backward_refuse_it(pools):
    """A convolution split over row bands (Sana's feed-forward) and flex_attention under SP have no
    backward: a forward that would need one raises the same ValueError on every rank, before any
    exchange (inference still runs). On CPU torch's flex_attention has no backward of its own either,
    so the flex refusal is checked on the op."""
    for messages, words in ((pools(2).run(model_grad_tasks.refused_backward, "SanaTransformer2DModel", 1, 2),
                             "halo exchange"),
                            (pools(2).run(model_grad_tasks.refused_flex_backward), "flex_attention")):
        assert len(set(messages)) == 1 and words in messages[0] and "torch.no_grad()" in messages[0]

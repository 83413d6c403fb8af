"""lightning_jax.generate: left-padded batches, greedy = step-by-step argmax, sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lightning_jax
from lightning_jax.generation import sample_logits
from lightning_jax.models import TNL, TNLConfig, Transformer, TransformerConfig

PAD = 0


def left_padded_prompts():
    """Three prompts of lengths 4, 7 and 1, left-padded with PAD to length 7."""
    prompts = [[5, 9, 200, 17], [1, 2, 3, 4, 5, 6, 7], [42]]
    width = max(map(len, prompts))
    return prompts, jnp.asarray([[PAD] * (width - len(p)) + p for p in prompts], jnp.int32)


@pytest.mark.parametrize("model_cls, config", [
    (TNL, TNLConfig.tiny(init_std=0.2, block_size=4)),
    (Transformer, TransformerConfig.tiny(init_std=0.2)),
], ids=["tnl", "transformer"])
def test_greedy_generation_equals_argmax_of_full_forward(model_cls, config):
    model = model_cls(config, rngs=nnx.Rngs(0))
    prompts, batch = left_padded_prompts()
    new = 5
    generated = lightning_jax.generate(model, batch, new, temperature=0.0, rng=jax.random.key(0), pad_id=PAD)
    assert generated.shape == (3, new) and generated.dtype == jnp.int32

    forward = nnx.jit(lambda m, t: m(t))
    for prompt, row in zip(prompts, np.asarray(generated)):
        sequence = list(prompt)
        for _ in range(new):  # each row alone, unpadded, re-running the whole sequence
            # Right-padded to one width (one compilation): causal, so the tail does not matter.
            buffer = jnp.asarray([sequence + [PAD] * (16 - len(sequence))], jnp.int32)
            logits = forward(model, buffer)[0, len(sequence) - 1]
            sequence.append(int(jnp.argmax(logits)))
        assert list(row) == sequence[len(prompt):]


def test_sampling_is_reproducible_and_respects_top_k():
    model = TNL(TNLConfig.tiny(init_std=0.2), rngs=nnx.Rngs(0))
    _, batch = left_padded_prompts()
    kwargs = dict(temperature=1.0, top_k=3, rng=jax.random.key(7))
    a = lightning_jax.generate(model, batch, 6, **kwargs)
    b = lightning_jax.generate(model, batch, 6, **kwargs)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(lightning_jax.generate(
        model, batch, 6, temperature=1.0, top_k=3, rng=jax.random.key(8))))
    # A tiny top_p reduces to greedy.
    greedy = lightning_jax.generate(model, batch, 6, temperature=0.0, rng=jax.random.key(0))
    sampled = lightning_jax.generate(model, batch, 6, temperature=1.5, top_p=1e-6, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy))


def test_sample_logits_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.key(0)
    tokens = sample_logits(logits, keys, jnp.float32(1.0), top_k=2)
    assert set(np.unique(np.asarray(tokens))) == {0, 1}
    tokens = sample_logits(logits, keys, jnp.float32(1.0), top_p=jnp.float32(0.9))
    assert set(np.unique(np.asarray(tokens))) == {0, 1, 2}  # 0.5 + 0.3 < 0.9 needs the third
    for greedy in (dict(temperature=jnp.float32(0.0)), dict(temperature=jnp.float32(1.0), top_k=1)):
        tokens = sample_logits(logits, keys, **greedy)
        assert set(np.unique(np.asarray(tokens))) == {0}


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_arguments_name_the_argument(kwargs, field):
    model = TNL(TNLConfig.tiny(), rngs=nnx.Rngs(0))
    args = dict(max_new_tokens=2, rng=jax.random.key(0)) | kwargs
    with pytest.raises(ValueError, match=field):
        lightning_jax.generate(model, jnp.ones((1, 3), jnp.int32), **args)


# A scanned model decodes through its unscanned copy (generation.decoding_model): same tokens.
SCANNED = [
    (TNL, TNLConfig.tiny(num_layers=4, lrpe_layers=(0,), scan_layers=True, init_std=0.2, block_size=4)),
    (Transformer, TransformerConfig.tiny(scan_layers=True, init_std=0.2)),
]


def _generate_scanned(model, batch, new, **kwargs):
    """What `generate` did before decoding_model: decode through the scanned layers themselves."""
    from lightning_jax import generation

    tokens, pad_mask, temperature, top_p = generation._check_arguments(
        model, batch, new, kwargs["temperature"], kwargs.get("top_k"), kwargs.get("top_p"), PAD, None, None)
    return generation._generate(*nnx.split(model), tokens, pad_mask, kwargs["rng"], temperature, top_p,
                                max_new_tokens=new, top_k=kwargs.get("top_k"), prefill_chunk=None)


@pytest.mark.parametrize("model_cls, config", SCANNED, ids=["tnl", "transformer"])
def test_scanned_models_decode_unscanned_with_the_same_tokens(model_cls, config):
    from lightning_jax.generation import Sampler, decoding_model
    from lightning_jax.models.stack import is_stacked

    model = model_cls(config, rngs=nnx.Rngs(0))
    assert is_stacked(model)
    plain = decoding_model(model)
    assert not is_stacked(plain) and plain.config.scan_layers is False and decoding_model(plain) is plain
    _, batch = left_padded_prompts()
    for kwargs in (dict(temperature=0.0, rng=jax.random.key(0)), dict(temperature=1.0, top_k=5, rng=jax.random.key(3))):
        expected = np.asarray(_generate_scanned(model, batch, 6, **kwargs))
        np.testing.assert_array_equal(np.asarray(lightning_jax.generate(model, batch, 6, pad_id=PAD, **kwargs)),
                                      expected)
        np.testing.assert_array_equal(np.asarray(lightning_jax.generate(plain, batch, 6, pad_id=PAD, **kwargs)),
                                      expected)
        sampler = Sampler(model, batch, 6, pad_id=PAD, **kwargs)
        assert not is_stacked(nnx.merge(sampler._graphdef, sampler._state))
        np.testing.assert_array_equal(np.stack([np.asarray(t) for t in sampler], axis=1), expected)
    assert is_stacked(model)  # the caller's model is left as it was


def test_scanned_model_generates_inside_an_outer_jit():
    model_cls, config = SCANNED[0]
    model = model_cls(config, rngs=nnx.Rngs(0))
    _, batch = left_padded_prompts()
    kwargs = dict(temperature=0.0, rng=jax.random.key(0))
    inside = nnx.jit(lambda m, t: lightning_jax.generate(m, t, 4, pad_id=PAD, **kwargs))(model, batch)
    np.testing.assert_array_equal(np.asarray(inside), np.asarray(_generate_scanned(model, batch, 4, **kwargs)))

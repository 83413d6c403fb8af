"""Published TransNormerLLM checkpoints (models/hf_tnl.py), without the network or torch: the tests
write checkpoints in the official layout themselves (config.json, the official tensor names and
torch [out, in] shapes, bf16, sharded with an index json; safetensors and torch's zip .bin), load
them, compare the logits with an independent numpy forward written from the published architecture,
save them back bit for bit, and check that every error names the official field or tensor."""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import json
import math
import os
import pickle
import zipfile
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from lightning_jax.models import (
    TNL,
    TNLConfig,
    create_sharded_model,
    load_hf_tnl,
    make_mesh,
    save_hf_tnl,
)
from lightning_jax.models.hf_tnl import CheckpointFormatError, hf_tnl_config
from lightning_jax.models.sharding import partition_specs

BF16 = ml_dtypes.bfloat16

# A tiny checkpoint in the official config.json vocabulary: D 32, 3 layers, 4 heads of 8, GLU 48.
HF_CONFIG = {
    "model_type": "transnormer",
    "architectures": ["TransnormerForCausalLM"],
    "vocab_size": 300,
    "decoder_embed_dim": 32,
    "decoder_layers": 3,
    "decoder_attention_heads": 4,
    "hidden_dim": 32,
    "glu_dim": 48,
    "linear_use_lrpe_list": [1, 0, 0],
    "linear_act_fun": "silu",
    "no_scale_embedding": False,
    "norm_type": "simplermsnorm",
    "bias": False,
    "init_std": 0.02,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def hf_config(**changes):
    return {**copy.deepcopy(HF_CONFIG), **changes}


# ----------------------------------------------------------------------------------------------
# The official format, written here from its description (not with the module under test).


def official_tensors(hf, seed=0, lm_head=True):
    """Random bf16 weights with the official names and torch Linear shapes [out, in]."""
    rng = np.random.default_rng(seed)
    D, L, A, G, V = (hf["decoder_embed_dim"], hf["decoder_layers"], hf["hidden_dim"],
                     hf["glu_dim"] if hf["glu_dim"] != -1 else hf["decoder_embed_dim"], hf["vocab_size"])
    H = hf["decoder_attention_heads"]

    def normal(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(BF16)

    t = {"model.embed_tokens.weight": normal(V, D, std=1.0)}
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "token_mixer.qkvu_proj.weight"] = normal(4 * A, D)
        t[p + "token_mixer.out_proj.weight"] = normal(D, A)
        if hf["linear_use_lrpe_list"][i]:
            # The official initialisation, 10000^(-2i/d) over the flattened (head, channel) index,
            # plus noise so that a wrong reshape would show.
            theta = 10000.0 ** (-2.0 / A * np.arange(A)) * (1 + 0.3 * rng.random(A))
            t[p + "token_mixer.lrpe.theta"] = theta.reshape(H, 1, A // H).astype(BF16)
        t[p + "channel_mixer.l1.weight"] = normal(G, D)
        t[p + "channel_mixer.l2.weight"] = normal(G, D)
        t[p + "channel_mixer.l3.weight"] = normal(D, G)
    if lm_head:
        tied = hf.get("tie_word_embeddings", True)
        t["lm_head.weight"] = t["model.embed_tokens.weight"] if tied else normal(V, D)
    return t


def write_safetensors(path, hf, tensors, shards=1):
    """config.json and the tensors in `shards` safetensors files (an index json when > 1)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    names = list(tensors)
    if shards == 1:
        save_file({n: tensors[n] for n in names}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for s, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[i]: tensors[names[i]] for i in part}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({names[i]: file for i in part})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return path


# torch.save's zip format, written with the stdlib: data.pkl (protocol 2) whose tensors are
# torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks) and whose
# storages are persistent ids ("storage", torch.<X>Storage, key, location, numel); data/<key> holds
# each storage's little-endian bytes.

class _Global:
    """A reference to a global by name (the pickle's GLOBAL opcode), for globals not importable
    here (torch is not installed)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable
        raise NotImplementedError


class _StorageRef:
    def __init__(self, key, array):
        self.key, self.array = key, array


class _TensorRef:
    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def __reduce__(self):
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, tuple(self.shape), tuple(self.stride), False, collections.OrderedDict()))


_STORAGE_NAMES = {np.dtype(BF16): "BFloat16Storage", np.dtype(np.float16): "HalfStorage",
                  np.dtype(np.float32): "FloatStorage"}


class _TorchPickler(pickle._Pickler):
    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def _save_global_ref(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_global_ref

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", _Global("torch", _STORAGE_NAMES[obj.array.dtype]), obj.key, "cpu", obj.array.size)
        return None


def write_torch_bin(file, tensors: dict[str, _TensorRef]):
    storages = {t.storage.key: t.storage for t in tensors.values()}
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(collections.OrderedDict(tensors))
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, storage in storages.items():
            z.writestr(f"archive/data/{key}", storage.array.tobytes())
        z.writestr("archive/version", "3\n")


def contiguous(key, array):
    flat = np.ascontiguousarray(array)
    return _TensorRef(_StorageRef(key, flat.reshape(-1)), 0, array.shape,
                      [int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)])


def write_torch_checkpoint(path, hf, tensors):
    """pytorch_model-0000{1,2}-of-00002.bin and pytorch_model.bin.index.json; the tied lm_head shares
    the embedding's storage (as torch.save writes it), l3 of layer 1 is a transposed view, and the
    LRPE theta sits at an offset inside a larger storage."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    refs = {}
    for i, (name, array) in enumerate(tensors.items()):
        if name == "lm_head.weight" and array is tensors["model.embed_tokens.weight"]:
            refs[name] = refs["model.embed_tokens.weight"]
        elif name == "model.layers.1.channel_mixer.l3.weight":  # [D, G] stored as its transpose
            storage = _StorageRef(str(i), np.ascontiguousarray(array.T).reshape(-1))
            refs[name] = _TensorRef(storage, 0, array.shape, (1, array.shape[0]))
        elif name.endswith("lrpe.theta"):
            padded = np.concatenate([np.full(5, 7.0, array.dtype), array.reshape(-1)])
            refs[name] = _TensorRef(_StorageRef(str(i), padded), 5, array.shape,
                                    [int(np.prod(array.shape[j + 1:])) for j in range(array.ndim)])
        else:
            refs[name] = contiguous(str(i), array)
    names = list(refs)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    if "lm_head.weight" in halves["pytorch_model-00002-of-00002.bin"]:  # keep a shared storage in one file
        halves["pytorch_model-00002-of-00002.bin"].remove("lm_head.weight")
        halves["pytorch_model-00001-of-00002.bin"].append("lm_head.weight")
    for file, part in halves.items():
        write_torch_bin(os.path.join(path, file), {n: refs[n] for n in part})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: file for file, part in halves.items() for n in part}}, f)
    return path


def read_safetensors_dir(path):
    """Every tensor of a directory's *.safetensors files, by name."""
    out = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), framework="numpy") as f:
                names = f.keys()  # a safe_open handle is not iterable
                out.update({name: f.get_tensor(name) for name in names})
    return out


# ----------------------------------------------------------------------------------------------
# An independent forward: TransNormerLLM as the paper and the released code describe it, float64.


def official_slopes(heads):
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    p = 2 ** math.floor(math.log2(heads))
    return power_of_2(p) + official_slopes(2 * p)[0::2][: heads - p]


def srms(x, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def numpy_forward(hf, tensors, tokens):
    """tokens [batch, time] -> logits [batch, time, vocab], float64."""
    w = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    D, L, H, A = hf["decoder_embed_dim"], hf["decoder_layers"], hf["decoder_attention_heads"], hf["hidden_dim"]
    d = A // H
    act = {"silu": lambda x: x / (1 + np.exp(-x)), "relu": lambda x: np.maximum(x, 0), "none": lambda x: x}[
        hf["linear_act_fun"]]
    T = tokens.shape[1]
    x = w["model.embed_tokens.weight"][tokens] * (1.0 if hf["no_scale_embedding"] else math.sqrt(D))
    slopes = np.asarray(official_slopes(H))
    t = np.arange(T)
    for layer in range(L):
        p = f"model.layers.{layer}."
        q, k, v, u = np.split(srms(x) @ w[p + "token_mixer.qkvu_proj.weight"].T, 4, axis=-1)
        q, k, v = (z.reshape(*z.shape[:2], H, d) for z in (q, k, v))  # "b n (h d)"
        q, k = act(q), act(k)
        if hf["linear_use_lrpe_list"][layer]:
            angle = t[:, None, None] * w[p + "token_mixer.lrpe.theta"][:, 0, :][None]  # [T, H, d]
            q = np.concatenate([q * np.cos(angle), q * np.sin(angle)], axis=-1)
            k = np.concatenate([k * np.cos(angle), k * np.sin(angle)], axis=-1)
        rate = slopes * (1 - layer / (L - 1) + 1e-5)
        gap = t[:, None] - t[None, :]
        decay = np.where(gap >= 0, np.exp(-rate[:, None, None] * np.maximum(gap, 0)), 0.0)  # [H, T, S]
        scores = np.einsum("bthe,bshe->bhts", q, k) * decay
        o = np.einsum("bhts,bshd->bthd", scores, v).reshape(*x.shape[:2], A)
        x = x + (u * srms(o)) @ w[p + "token_mixer.out_proj.weight"].T
        h = srms(x)
        glu = (h @ w[p + "channel_mixer.l1.weight"].T) * (h @ w[p + "channel_mixer.l2.weight"].T)
        x = x + glu @ w[p + "channel_mixer.l3.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return srms(x) @ head.T


# ----------------------------------------------------------------------------------------------
# Loading: logits against the independent forward.

VARIANTS = {
    # silu, LRPE on layer 0, tied head absent from the files, sharded safetensors with an index.
    "released": {"changes": {}, "lm_head": False, "shards": 3},
    # relu, no embedding scale, separate head, LRPE on two layers, one file.
    "relu-untied": {"changes": {"linear_act_fun": "relu", "no_scale_embedding": True, "tie_word_embeddings": False,
                                     "linear_use_lrpe_list": [1, 0, 1]}, "lm_head": True, "shards": 1},
    # no activation on q and k, no LRPE, glu_dim -1 (= D), tied head present.
    "none": {"changes": {"linear_act_fun": "none", "linear_use_lrpe_list": [0, 0, 0], "glu_dim": -1},
                 "lm_head": True, "shards": 2},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loaded_model_matches_an_independent_forward(tmp_path, variant):
    spec = VARIANTS[variant]
    hf = hf_config(**spec["changes"])
    tensors = official_tensors(hf, lm_head=spec["lm_head"])
    path = write_safetensors(tmp_path / "ckpt", hf, tensors, shards=spec["shards"])
    tokens = np.random.default_rng(1).integers(0, hf["vocab_size"], (2, 40))
    expected = numpy_forward(hf, tensors, tokens)

    # fp32 (bf16 weights widen exactly), blocks of 16 so that the op carries state across blocks.
    config = hf_tnl_config(path, TNLConfig(block_size=16), dtype="float32")
    model = load_hf_tnl(path, config=config)
    assert model.config.param_dtype == "float32" and model.config.attention_activation == hf["linear_act_fun"]
    logits = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, atol=2e-5 * scale, rtol=0)

    # By default the weights keep their stored dtype (bf16), bit for bit.
    bf16 = load_hf_tnl(path)
    assert bf16.config.dtype == bf16.config.param_dtype == "bfloat16"
    embed = np.asarray(bf16.embed[...])
    assert embed.dtype == BF16 and np.array_equal(embed.view(np.uint16),
                                                  tensors["model.embed_tokens.weight"].view(np.uint16))
    close = np.asarray(bf16(jnp.asarray(tokens, jnp.int32)))
    assert np.abs(close - expected).max() < 0.05 * scale


def test_layout_mapping_is_the_official_one(tmp_path):
    # One layer checked parameter by parameter against the official layout description.
    hf = hf_config()
    tensors = official_tensors(hf)
    model = load_hf_tnl(write_safetensors(tmp_path / "ckpt", hf, tensors))
    mixer, glu = model.groups[0].mixer, model.groups[0].glu
    qkvu = tensors["model.layers.0.token_mixer.qkvu_proj.weight"]  # [4 A, D]: q, k, v, u blocks
    A, H, d = 32, 4, 8
    for f in range(4):
        for h in range(H):
            np.testing.assert_array_equal(np.asarray(mixer.qkvu[...])[:, f, h, :],
                                          qkvu[f * A + h * d: f * A + (h + 1) * d, :].T)
    out = tensors["model.layers.0.token_mixer.out_proj.weight"]  # [D, A]
    np.testing.assert_array_equal(np.asarray(mixer.out[...])[2], out[:, 2 * d:3 * d].T)
    np.testing.assert_array_equal(np.asarray(mixer.lrpe.theta[...]),
                                  tensors["model.layers.0.token_mixer.lrpe.theta"][:, 0, :])
    np.testing.assert_array_equal(np.asarray(glu.w12[...])[:, 0], tensors["model.layers.0.channel_mixer.l1.weight"].T)
    np.testing.assert_array_equal(np.asarray(glu.w12[...])[:, 1], tensors["model.layers.0.channel_mixer.l2.weight"].T)
    np.testing.assert_array_equal(np.asarray(glu.w3[...]), tensors["model.layers.0.channel_mixer.l3.weight"].T)
    assert model.groups[1].mixer.lrpe is None


# ----------------------------------------------------------------------------------------------
# Saving: back to the same bits.


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_save_writes_back_the_same_bits(tmp_path, scan):
    hf = hf_config(tie_word_embeddings=False, linear_use_lrpe_list=[1, 0, 0])
    tensors = official_tensors(hf)
    source = write_safetensors(tmp_path / "in", hf, tensors, shards=2)
    model = load_hf_tnl(source, config=hf_tnl_config(source, TNLConfig(scan_layers=scan), dtype="bfloat16"))
    assert model.groups_layout == (((0, 1), (1, 2)) if scan else ((0, 1), (1, 1), (2, 1)))
    out = tmp_path / "out"
    save_hf_tnl(model, str(out), max_shard_bytes=20_000)  # several shards and an index
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
    saved = read_safetensors_dir(out)
    assert set(saved) == set(tensors)
    for name, tensor in tensors.items():
        assert saved[name].dtype == BF16 and saved[name].shape == tensor.shape, name
        assert np.array_equal(saved[name].view(np.uint16), tensor.view(np.uint16)), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    written = json.loads((out / "config.json").read_text())
    for key in ("model_type", "vocab_size", "decoder_embed_dim", "decoder_layers", "decoder_attention_heads",
                "hidden_dim", "glu_dim", "linear_use_lrpe_list", "linear_act_fun", "no_scale_embedding",
                "norm_type", "bias", "tie_word_embeddings", "torch_dtype"):
        assert written[key] == hf.get(key, True), key
    # And it loads again, to the same parameters.
    again = load_hf_tnl(str(out))
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(load_hf_tnl(source), nnx.Param)),
                                  nnx.to_flat_state(nnx.state(again, nnx.Param))):
        assert p1 == p2 and np.array_equal(np.asarray(v1[...]).view(np.uint16), np.asarray(v2[...]).view(np.uint16))


def test_saving_a_tied_model_writes_the_head_and_refuses_to_overwrite(tmp_path):
    model = TNL(TNLConfig.tiny(vocab_size=64), rngs=nnx.Rngs(0))
    save_hf_tnl(model, str(tmp_path / "out"))
    saved = read_safetensors_dir(tmp_path / "out")
    assert os.path.exists(tmp_path / "out" / "model.safetensors")
    assert np.array_equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])
    assert saved["model.layers.0.token_mixer.qkvu_proj.weight"].dtype == np.float32
    with pytest.raises(CheckpointFormatError) as e:
        save_hf_tnl(model, str(tmp_path / "out"))
    assert e.value.field == "path"
    save_hf_tnl(model, str(tmp_path / "out"), overwrite=True, dtype="bfloat16")
    assert read_safetensors_dir(tmp_path / "out")["lm_head.weight"].dtype == BF16
    logits = model(jnp.arange(10, dtype=jnp.int32)[None])
    reloaded = load_hf_tnl(str(tmp_path / "out"), dtype="float32")
    assert reloaded.config.tie_embeddings and reloaded.lm_head is None
    np.testing.assert_allclose(reloaded(jnp.arange(10, dtype=jnp.int32)[None]), logits, atol=0.05)


@pytest.mark.parametrize("field, changes", [
    ("decay", {"decay": "paper"}),
    ("norm_eps", {"norm_eps": 1e-5}),
    ("head_dim", {"head_dim": 8}),  # LRPE with head_dim != D / heads
])
def test_save_refuses_what_the_official_model_cannot_express(tmp_path, field, changes):
    model = nnx.eval_shape(lambda: TNL(TNLConfig.tiny(**changes), rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointFormatError) as e:
        save_hf_tnl(model, str(tmp_path / "out"))
    assert e.value.field == field
    assert not os.path.exists(tmp_path / "out")


def test_save_refuses_a_model_laid_out_for_decoding(tmp_path):
    from lightning_jax.generation import decoding_model

    model = decoding_model(TNL(TNLConfig.tiny(), rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointFormatError, match="laid out for decoding") as e:
        save_hf_tnl(model, str(tmp_path / "out"))
    assert e.value.field == "model"
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# pytorch_model*.bin, read without torch.


def test_torch_bin_checkpoint_loads_like_safetensors(tmp_path):
    hf = hf_config()
    tensors = official_tensors(hf)  # tied head present: it shares the embedding's storage
    from_bin = load_hf_tnl(write_torch_checkpoint(tmp_path / "bin", hf, tensors))
    from_st = load_hf_tnl(write_safetensors(tmp_path / "st", hf, tensors))
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(from_bin, nnx.Param)),
                                  nnx.to_flat_state(nnx.state(from_st, nnx.Param))):
        assert p1 == p2 and np.array_equal(np.asarray(v1[...]).view(np.uint16), np.asarray(v2[...]).view(np.uint16)), p1
    save_hf_tnl(from_bin, str(tmp_path / "out"))  # .bin in, safetensors out, same bits
    saved = read_safetensors_dir(tmp_path / "out")
    assert all(np.array_equal(saved[n].view(np.uint16), t.view(np.uint16)) for n, t in tensors.items())


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_torch_bin_half_and_float_storages(tmp_path, dtype):
    hf = hf_config()
    tensors = {n: t.astype(dtype) for n, t in official_tensors(hf, lm_head=False).items()}
    os.makedirs(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf))
    write_torch_bin(tmp_path / "ckpt" / "pytorch_model.bin",
                    {n: contiguous(str(i), t) for i, (n, t) in enumerate(tensors.items())})
    model = load_hf_tnl(str(tmp_path / "ckpt"))
    assert model.config.param_dtype == np.dtype(dtype).name
    np.testing.assert_array_equal(np.asarray(model.groups[2].glu.w3[...]),
                                  tensors["model.layers.2.channel_mixer.l3.weight"].T)


def test_torch_bin_with_other_globals_is_refused(tmp_path):
    os.makedirs(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(HF_CONFIG))
    buffer = io.BytesIO()
    pickle.dump({"model.embed_tokens.weight": os.system}, buffer, protocol=2)  # a global we must not load
    with zipfile.ZipFile(tmp_path / "ckpt" / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
    with pytest.raises(CheckpointFormatError, match="is not allowed"):
        load_hf_tnl(str(tmp_path / "ckpt"))


# ----------------------------------------------------------------------------------------------
# Errors name the official field or tensor.


@pytest.mark.parametrize("field, changes", [
    ("linear_act_fun", {"linear_act_fun": "gelu"}),
    ("norm_type", {"norm_type": "layernorm"}),
    ("bias", {"bias": True}),
    ("model_type", {"model_type": "llama"}),
    ("hidden_dim", {"hidden_dim": 30}),  # not a multiple of 4 heads
    ("linear_use_lrpe_list", {"linear_use_lrpe_list": [1, 0]}),  # 2 flags for 3 layers
])
def test_unsupported_config_names_the_field(tmp_path, field, changes):
    hf = hf_config(**changes)
    path = write_safetensors(tmp_path / "ckpt", hf, official_tensors(hf_config()))
    with pytest.raises(CheckpointFormatError) as e:
        load_hf_tnl(path)
    assert e.value.field == field and field in str(e.value)


def test_missing_tensor_is_named_by_its_official_name(tmp_path):
    tensors = official_tensors(HF_CONFIG)
    del tensors["model.layers.1.channel_mixer.l3.weight"]
    path = write_safetensors(tmp_path / "ckpt", HF_CONFIG, tensors, shards=2)
    with pytest.raises(CheckpointFormatError) as e:
        load_hf_tnl(path)
    assert e.value.field == "model.layers.1.channel_mixer.l3.weight"
    assert "missing" in str(e.value)


def test_untied_checkpoint_without_lm_head_is_missing_it(tmp_path):
    hf = hf_config(tie_word_embeddings=False)
    path = write_safetensors(tmp_path / "ckpt", hf, official_tensors(hf, lm_head=False))
    with pytest.raises(CheckpointFormatError) as e:
        load_hf_tnl(path)
    assert e.value.field == "lm_head.weight"


@pytest.mark.parametrize("problem", ["shape", "unexpected", "untied-head"])
def test_tensor_problems_are_named(tmp_path, problem):
    tensors = official_tensors(HF_CONFIG)
    name = {"shape": "model.layers.2.token_mixer.out_proj.weight",
            "unexpected": "model.layers.1.token_mixer.lrpe.theta",
            "untied-head": "lm_head.weight"}[problem]
    if problem == "shape":
        tensors[name] = tensors[name][:, :16]
    elif problem == "unexpected":  # LRPE is off in layer 1
        tensors[name] = tensors["model.layers.0.token_mixer.lrpe.theta"]
    else:  # tie_word_embeddings (default true) with a different head
        tensors[name] = (tensors[name].astype(np.float32) + 1).astype(BF16)
    path = write_safetensors(tmp_path / "ckpt", HF_CONFIG, tensors)
    with pytest.raises(CheckpointFormatError) as e:
        load_hf_tnl(path)
    assert e.value.field == name


def test_missing_directory_and_weights_name_the_path(tmp_path):
    with pytest.raises(CheckpointFormatError) as e:
        load_hf_tnl(str(tmp_path / "nowhere"))
    assert e.value.field == "path"
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(CheckpointFormatError, match="safetensors") as e:
        load_hf_tnl(str(tmp_path / "empty"))
    assert e.value.field == "path"


def test_config_with_another_architecture_is_refused(tmp_path):
    path = write_safetensors(tmp_path / "ckpt", HF_CONFIG, official_tensors(HF_CONFIG))
    config = hf_tnl_config(path)
    with pytest.raises(CheckpointFormatError) as e:
        load_hf_tnl(path, config=dataclasses.replace(config, glu_dim=64))
    assert e.value.field == "glu_dim"


# ----------------------------------------------------------------------------------------------
# Sharded: each parameter lands in its sharding.


def test_load_on_a_mesh_places_each_parameter_in_its_sharding(tmp_path):
    hf = hf_config(tie_word_embeddings=False)
    tensors = official_tensors(hf)
    path = write_safetensors(tmp_path / "ckpt", hf, tensors, shards=2)
    mesh = make_mesh(1, 2, 4)
    config = hf_tnl_config(path, TNLConfig(scan_layers=True), dtype="float32")
    model = load_hf_tnl(path, mesh=mesh, config=config)
    reference = create_sharded_model(lambda: TNL(config, rngs=nnx.Rngs(0)), mesh)
    assert nnx.graphdef(model) == nnx.graphdef(reference)
    plain = load_hf_tnl(path, config=config)
    specs = nnx.to_flat_state(partition_specs(model))
    loaded = nnx.to_flat_state(nnx.state(model, nnx.Param))
    fresh = nnx.to_flat_state(nnx.state(reference, nnx.Param))
    unsharded = nnx.to_flat_state(nnx.state(plain, nnx.Param))
    for (path_, _), (_, v), (_, r), (_, u) in zip(specs, loaded, fresh, unsharded):
        value = v[...]
        assert value.sharding.is_equivalent_to(r[...].sharding, value.ndim), path_
        assert v.get_metadata()["out_sharding"] == r.get_metadata()["out_sharding"], path_
        np.testing.assert_array_equal(np.asarray(value), np.asarray(u[...]))
    assert model.groups[1].mixer.qkvu[...].sharding.spec == jax.P(None, "fsdp", None, "tensor", None)  # [layers, ...]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 12)), jnp.int32)
    with jax.set_mesh(mesh):
        sharded_logits = jax.jit(lambda t: model(t))(tokens)
    np.testing.assert_allclose(np.asarray(sharded_logits), np.asarray(plain(tokens)), atol=1e-4, rtol=1e-4)
    # And back: the saved tensors are the checkpoint's.
    save_hf_tnl(model, str(tmp_path / "out"), dtype="bfloat16")
    saved = read_safetensors_dir(tmp_path / "out")
    assert all(np.array_equal(saved[n].view(np.uint16), t.view(np.uint16)) for n, t in tensors.items())


# ----------------------------------------------------------------------------------------------
# Training starts from converted weights.


def test_training_starts_from_a_checkpoint(tmp_path):
    from lightning_jax.training.config import ConfigError, TrainConfig
    from lightning_jax.training.run import setup_run

    hf = hf_config()
    tensors = official_tensors(hf)
    path = str(write_safetensors(tmp_path / "ckpt", hf, tensors))
    # The demo's tiny model fields are replaced by the checkpoint's; dtype and scan are the run's.
    config = TrainConfig.from_dict({
        "steps": 2, "workdir": str(tmp_path / "run"), "init_from": path,
        "model": {"arch": "tnl", "preset": "tiny", "vocab_size": 257, "num_layers": 2,
                  "param_dtype": "float32", "scan_layers": True},
        "data": {"seq_len": 16, "batch_size": 8}, "mesh": {"data": 4, "fsdp": 2},
    })
    run = setup_run(config)
    model_config = run.model_config
    assert (model_config.num_layers, model_config.vocab_size, model_config.param_dtype) == (3, 300, "float32")
    params = run.state["params"]
    qkvu = np.asarray(params["groups"][1]["mixer"]["qkvu"][...])  # scanned layers 1 and 2
    np.testing.assert_array_equal(
        qkvu[1], tensors["model.layers.2.token_mixer.qkvu_proj.weight"].astype(np.float32)
        .reshape(4, 4, 8, 32).transpose(3, 0, 1, 2))
    assert params["embed"][...].sharding.spec == jax.P("tensor", "fsdp")

    with pytest.raises(ConfigError) as e:
        setup_run(dataclasses.replace(config, init_from=str(tmp_path / "nowhere")))
    assert e.value.field == "config.init_from"
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"steps": 2, "workdir": "w", "init_from": path, "model": {"arch": "transformer"}})
    assert e.value.field == "config.init_from"


def test_train_cli_fine_tunes_from_a_checkpoint(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = write_safetensors(tmp_path / "ckpt", HF_CONFIG, official_tensors(HF_CONFIG))
    proc = subprocess.run(
        [sys.executable, "train/main.py", "--config", "train/configs/demo.py", f"--config.workdir={tmp_path / 'run'}",
         f"--config.init_from={path}", "--config.steps=2", "--config.data.seq_len=32", "--config.data.batch_size=8",
         "--config.eval.max_tokens=512", "--config.checkpoint.enabled=False", "--config.log.every_steps=1",
         "--config.log.progress_bar=False"],
        cwd=root, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    bad = subprocess.run(
        [sys.executable, "train/main.py", "--config", "train/configs/demo.py", f"--config.workdir={tmp_path / 'bad'}",
         f"--config.init_from={tmp_path / 'nowhere'}"],
        cwd=root, capture_output=True, text=True, timeout=300, check=False,
    )
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
    assert lines[0].startswith("error: config.init_from"), bad.stderr[-2000:]


def test_attention_activation_is_a_checked_config_field():
    from lightning_jax.checks import ArgumentError

    assert TNLConfig().attention_activation == "silu"
    with pytest.raises(ArgumentError) as e:
        TNLConfig(attention_activation="gelu")
    assert e.value.field == "attention_activation" and "'silu', 'relu', 'none'" in str(e.value)

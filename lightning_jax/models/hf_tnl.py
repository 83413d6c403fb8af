"""Published TransNormerLLM checkpoints (OpenNLPLab, Hugging Face layout) in and out of a `TNL`.

    model = load_hf_tnl("TransNormerLLM-385M")                 # bf16 weights -> bf16 TNL
    model = load_hf_tnl(path, dtype="float32", mesh=make_mesh(fsdp=8))
    save_hf_tnl(model, "out/")                                 # loads in the official code

A checkpoint directory holds `config.json` (model_type "transnormer") and the weights, as
`*.safetensors` or `pytorch_model*.bin`, one file or several listed by an index json
(`model.safetensors.index.json`, `pytorch_model.bin.index.json`). `.bin` files are read without
torch: a restricted unpickler accepts only tensors, ordered dicts and bf16 / fp16 / fp32 storages.
Saving writes safetensors.

config.json -> TNLConfig (the official field -> ours):

    decoder_embed_dim -> hidden_dim (D)            decoder_layers -> num_layers
    decoder_attention_heads -> num_heads           hidden_dim (q/k/v/u width) -> num_heads x head_dim
    glu_dim -> glu_dim (-1: D)                     vocab_size -> vocab_size
    linear_use_lrpe_list (a flag per layer) -> lrpe_layers
    linear_act_fun (silu | swish | relu | none) -> attention_activation
    no_scale_embedding -> not scale_embedding      tie_word_embeddings (default true) -> tie_embeddings
    init_std -> init_std                           norm_type must be "simplermsnorm", bias false

Weights (torch Linear layout [out, in]; names under `model.`, except `lm_head.weight`), layer i:

    layers.i.token_mixer.qkvu_proj.weight [4 A, D]     -> mixer.qkvu [D, 4, heads, head_dim]
        rows: q, k, v, u blocks of A = heads x head_dim, each head-major (torch: chunk(4), then
        "(h d)")
    layers.i.token_mixer.out_proj.weight [D, A]        -> mixer.out [heads, head_dim, D]
    layers.i.token_mixer.lrpe.theta [heads, 1, head_dim] -> mixer.lrpe.theta [heads, head_dim]
    layers.i.channel_mixer.l1.weight, l2.weight [G, D] -> glu.w12 [D, 2, G] (l1 at 0, l2 at 1)
    layers.i.channel_mixer.l3.weight [D, G]            -> glu.w3 [G, D]
    embed_tokens.weight [V, D]                         -> embed [V, D]
    lm_head.weight [V, D]                              -> lm_head [D, V]; tied: equal to the
                                                          embedding, and may be absent

Anything our TNL cannot express is an error naming the official field; a missing, misshapen or
unexpected tensor is an error naming it. Tensors are read and placed one at a time, each straight
into its sharding when a mesh is given, so a model larger than one device loads; saving gathers one
tensor at a time to the host (process 0 writes).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lightning_jax.checks import ArgumentError, check_instance, is_int
from lightning_jax.models.config import DTYPES, TNLConfig
from lightning_jax.models.layers import laid_out_for_decoding
from lightning_jax.models.sharding import DEFAULT_RULES, logical_to_spec
from lightning_jax.models.tnl import TNL

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
MODEL_TYPE = "transnormer"
# The official TransnormerConfig's defaults: what the official code uses for a field config.json lacks.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 64000, "decoder_embed_dim": 1024, "decoder_layers": 24, "decoder_attention_heads": 8,
    "hidden_dim": 1024, "glu_dim": 2816, "linear_use_lrpe_list": [], "linear_act_fun": "silu",
    "no_scale_embedding": False, "norm_type": "simplermsnorm", "bias": False, "init_std": 0.02,
    "tie_word_embeddings": True,
}
# linear_act_fun -> TNLConfig.attention_activation. The official code maps names it does not know
# to the identity; we accept only these and refuse the others (gelu, elu, 1+elu, ...).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "none": "none", "identity": "none"}
# The official SimpleRMSNorm's eps (fixed in its code) and the only decay schedule it has.
OFFICIAL_NORM_EPS = 1e-6
OFFICIAL_DECAY = "tnl"
# TNLConfig fields a checkpoint fixes; the others (dtype, param_dtype, scan_layers, remat,
# attention_implementation, block_size, decode_implementation, init_std) are free choices of the run.
ARCHITECTURE_FIELDS = (
    "vocab_size", "num_layers", "hidden_dim", "num_heads", "head_dim", "glu_dim", "lrpe_layers",
    "attention_activation", "scale_embedding", "tie_embeddings", "decay", "norm_eps", "output_gate",
)
# Saved shards hold at most this many bytes (a larger tensor gets a shard of its own): the host
# holds one shard at a time while saving.
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9

_SAFETENSORS_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}
_TORCH_STORAGES = {"BFloat16Storage": ml_dtypes.bfloat16, "HalfStorage": np.float16, "FloatStorage": np.float32}
_IGNORED_TENSORS = ("decoder.version",)  # the official model ignores it on load


class CheckpointFormatError(ArgumentError):
    """A checkpoint this TNL cannot load, or a model the official format cannot hold. `field` is the
    official name (a config.json field, a tensor name) or ``path``."""


def _fail(field: str, detail: str):
    raise CheckpointFormatError(field, detail)


# ----------------------------------------------------------------------------------------------
# config.json <-> TNLConfig


def read_hf_config(path: str) -> dict[str, Any]:
    """The `config.json` of checkpoint directory `path`, as a dict (model_type checked)."""
    file = os.path.join(_check_dir(path), CONFIG_FILE)
    if not os.path.isfile(file):
        _fail("path", f"got {path!r}, expected a checkpoint directory with {CONFIG_FILE}")
    try:
        with open(file, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        _fail(CONFIG_FILE, f"{file} is not readable JSON ({e})")
    if not isinstance(hf, dict):
        _fail(CONFIG_FILE, f"{file} holds {type(hf).__name__}, expected a JSON object")
    if hf.get("model_type") != MODEL_TYPE:
        _fail("model_type", f"got {hf.get('model_type')!r} in {file}, expected {MODEL_TYPE!r} (TransNormerLLM)")
    return hf


def tnl_config_from_hf(hf: Mapping[str, Any], base: TNLConfig | None = None, *, dtype=None) -> TNLConfig:
    """The TNLConfig of an official config.json (a dict): the architecture from `hf`, the other
    fields from `base` (default: TNLConfig's defaults with `init_std` from `hf`). `dtype`, if given,
    sets both the compute and the parameter dtype. Errors name the config.json field."""

    def get(key):
        return hf.get(key, OFFICIAL_DEFAULTS[key])

    def integer(key, minimum=1):
        value = get(key)
        if not is_int(value) or value < minimum:
            _fail(key, f"got {value!r}, expected an integer >= {minimum}")
        return int(value)

    def flag(key):
        value = get(key)
        if not isinstance(value, bool):
            _fail(key, f"got {value!r}, expected true or false")
        return value

    if get("norm_type") != "simplermsnorm":
        _fail("norm_type", f"got {get('norm_type')!r}, expected 'simplermsnorm' (the TNL norm has no "
                           "weights; the official code uses a LayerNorm with weights for any other value)")
    if get("bias") is not False:
        _fail("bias", f"got {get('bias')!r}, expected false (TNL's projections have no bias)")
    activation = get("linear_act_fun")
    if activation not in ACTIVATIONS:
        _fail("linear_act_fun", f"got {activation!r}, expected one of {sorted(ACTIVATIONS)} "
                                "(TNLConfig.attention_activation: silu, relu or none)")
    model_dim = integer("decoder_embed_dim")
    layers = integer("decoder_layers")
    heads = integer("decoder_attention_heads")
    width = integer("hidden_dim")
    if width % heads:
        _fail("hidden_dim", f"got {width}, expected a multiple of decoder_attention_heads={heads}")
    glu = get("glu_dim")
    glu = model_dim if glu == -1 else glu
    if not is_int(glu) or glu < 1:
        _fail("glu_dim", f"got {get('glu_dim')!r}, expected a positive integer or -1 (decoder_embed_dim)")
    lrpe_flags = get("linear_use_lrpe_list")
    if not isinstance(lrpe_flags, (list, tuple)):
        _fail("linear_use_lrpe_list", f"got {lrpe_flags!r}, expected a list of one flag per layer")
    if not lrpe_flags:  # the official code then reads one flag for every layer
        lrpe_flags = [hf.get("linear_use_lrpe", False)] * layers
    if len(lrpe_flags) < layers or any(not isinstance(f, (bool, int)) for f in lrpe_flags):
        _fail("linear_use_lrpe_list", f"got {lrpe_flags!r}, expected a 0/1 flag for each of the {layers} layers")
    lrpe_layers = tuple(i for i in range(layers) if lrpe_flags[i])
    head_dim = width // heads
    if lrpe_layers and head_dim != model_dim // heads:
        # The official Lrpe sizes theta by decoder_embed_dim / heads, q and k by hidden_dim / heads.
        _fail("hidden_dim", f"got {width}, expected decoder_embed_dim={model_dim} when LRPE is used "
                            "(the official LRPE theta has decoder_embed_dim / heads channels)")
    architecture = {
        "vocab_size": integer("vocab_size"), "num_layers": layers, "hidden_dim": model_dim, "num_heads": heads,
        "head_dim": head_dim, "glu_dim": int(glu), "lrpe_layers": lrpe_layers,
        "attention_activation": ACTIVATIONS[activation], "scale_embedding": not flag("no_scale_embedding"),
        "tie_embeddings": flag("tie_word_embeddings"), "decay": OFFICIAL_DECAY, "norm_eps": OFFICIAL_NORM_EPS,
        "output_gate": True,
    }
    if base is None:
        init_std = get("init_std")
        base = TNLConfig(init_std=float(init_std) if isinstance(init_std, (int, float)) else 0.02)
    if dtype is not None:
        dtype = _dtype_name("dtype", dtype)
        architecture.update(dtype=dtype, param_dtype=dtype)
    return dataclasses.replace(check_instance("base", base, TNLConfig), **architecture)


def hf_config_from_tnl(config: TNLConfig, *, dtype=None) -> dict[str, Any]:
    """The official config.json (a dict) of a TNLConfig; `dtype`: the saved weights' dtype (default
    the parameter dtype), recorded as torch_dtype. Errors name the TNLConfig field the official
    model cannot express."""
    c = check_instance("config", config, TNLConfig)
    if not c.output_gate:
        _fail("output_gate", "got False, expected True (the official token mixer always has the gate)")
    if c.decay != OFFICIAL_DECAY:
        _fail("decay", f"got {c.decay!r}, expected {OFFICIAL_DECAY!r} (the official model's only schedule)")
    if c.norm_eps != OFFICIAL_NORM_EPS:
        _fail("norm_eps", f"got {c.norm_eps!r}, expected {OFFICIAL_NORM_EPS} (fixed in the official SimpleRMSNorm)")
    if c.lrpe_layers and c.head_dim != c.hidden_dim // c.num_heads:
        _fail("head_dim", f"got {c.head_dim}, expected hidden_dim / num_heads = {c.hidden_dim // c.num_heads} "
                          "with LRPE layers (the official LRPE theta has decoder_embed_dim / heads channels)")
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["TransnormerForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_transnormer.TransnormerConfig",
            "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM",
        },
        "vocab_size": c.vocab_size,
        "decoder_embed_dim": c.hidden_dim,
        "decoder_layers": c.num_layers,
        "decoder_attention_heads": c.num_heads,
        "hidden_dim": c.attention_dim,
        "glu_dim": c.glu_dim,
        "linear_use_lrpe_list": [int(c.uses_lrpe(layer)) for layer in range(c.num_layers)],
        "linear_act_fun": c.attention_activation,
        "no_scale_embedding": not c.scale_embedding,
        "norm_type": "simplermsnorm",
        "bias": False,
        "init_std": c.init_std,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": _dtype_name("dtype", dtype if dtype is not None else c.param_dtype),
    }


def hf_tnl_config(path: str, base: TNLConfig | None = None, *, dtype=None) -> TNLConfig:
    """The TNLConfig of checkpoint directory `path`: the architecture from its config.json, the other
    fields from `base`; `dtype` (default: the stored weights' dtype when `base` is None) sets the
    compute and parameter dtype."""
    hf = read_hf_config(path)
    if base is None and dtype is None:
        with _open_weights(path) as weights:
            dtype = _stored_dtype(weights, _prefix(weights))
    return tnl_config_from_hf(hf, base, dtype=dtype)


def _dtype_name(field: str, dtype) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        _fail(field, f"got {dtype!r}, expected one of {list(DTYPES)}")
    return name


def _check_dir(path) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        _fail("path", f"got {path!r}, expected an existing checkpoint directory")
    return os.fspath(path)


# ----------------------------------------------------------------------------------------------
# Reading tensors: safetensors, and torch's zip format without torch.


class _TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype


class _SafetensorsFile:
    """One .safetensors file, read by the safetensors package (numpy, memory-mapped)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path, self._open = path, safe_open
        self.info: dict[str, _TensorInfo] = {}
        with safe_open(path, framework="numpy") as f:
            names = f.keys()
            for name in names:
                view = f.get_slice(name)
                kind = view.get_dtype()
                if kind not in _SAFETENSORS_DTYPES:
                    _fail(name, f"got dtype {kind} in {path}, expected one of {sorted(_SAFETENSORS_DTYPES)}")
                self.info[name] = _TensorInfo(tuple(view.get_shape()), np.dtype(_SAFETENSORS_DTYPES[kind]))

    def read(self, name: str) -> np.ndarray:
        with self._open(self.path, framework="numpy") as f:
            return f.get_tensor(name)


class _Storage(NamedTuple):
    key: str
    dtype: np.dtype


class _LazyTensor(NamedTuple):
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageType:
    """What a ``torch.<X>Storage`` global unpickles to: only its element type."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, shape, stride, *unused):
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor's storage is {type(storage).__name__}, expected a storage")
    return _LazyTensor(storage, int(offset), tuple(int(n) for n in shape), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *unused):
    """torch._utils._rebuild_parameter(data, requires_grad, hooks): the tensor itself."""
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict's data.pkl into `_LazyTensor`s, loading no other globals."""

    _GLOBALS: ClassVar[dict] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def find_class(self, module, name):
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[module, name]
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(_TORCH_STORAGES[name])
        raise pickle.UnpicklingError(
            f"global {module}.{name} is not allowed (a state dict of bf16, fp16 or fp32 tensors is expected)")

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"persistent id {pid!r} is not a tensor storage")
        return _Storage(str(pid[2]), pid[1].dtype)


class _TorchZipFile:
    """One pytorch_model*.bin in torch's zip format (torch >= 1.6): `<root>/data.pkl` (the state
    dict, whose tensors refer to storages by key) and `<root>/data/<key>` (each storage's bytes,
    little-endian). Storages are read only when a tensor is."""

    def __init__(self, path: str):
        self.path = path
        if not zipfile.is_zipfile(path):
            _fail(os.path.basename(path), f"{path} is not a zip archive (torch.save's format since torch 1.6)")
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                _fail(os.path.basename(path), f"{path} holds {len(pickles)} data.pkl files, expected 1")
            self._root = pickles[0][: -len("data.pkl")]
            if self._root + "byteorder" in names and z.read(self._root + "byteorder").strip() != b"little":
                _fail(os.path.basename(path), f"{path} is big-endian, expected little-endian storages")
            try:
                tree = _TorchUnpickler(io.BytesIO(z.read(pickles[0]))).load()
            except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as e:
                _fail(os.path.basename(path), f"{path} is not a state dict of tensors ({e})")
        if not isinstance(tree, dict) or not all(isinstance(t, _LazyTensor) for t in tree.values()):
            _fail(os.path.basename(path), f"{path} holds {type(tree).__name__}, expected a dict of tensors")
        self._tensors: dict[str, _LazyTensor] = dict(tree)
        self.info = {name: _TensorInfo(t.shape, t.storage.dtype) for name, t in self._tensors.items()}

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        with zipfile.ZipFile(self.path) as z:
            raw = z.read(f"{self._root}data/{t.storage.key}")
        flat = np.frombuffer(raw, dtype=t.storage.dtype)
        extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if all(t.shape) else 0
        if t.offset < 0 or t.offset + extent > flat.size or any(s < 0 for s in t.stride):
            _fail(name, f"its view (offset {t.offset}, shape {t.shape}, stride {t.stride}) runs outside its "
                        f"storage of {flat.size} elements in {self.path}")
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[t.offset:], t.shape, [s * itemsize for s in t.stride])
        return np.array(view)  # a contiguous copy: the storage's bytes go when this returns


class _Weights:
    """The tensors of a checkpoint directory, by name, over one or more files."""

    def __init__(self, files: dict[str, Any]):
        self._where: dict[str, Any] = {}
        for reader in files.values():
            for name in reader.info:
                self._where.setdefault(name, reader)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def info(self, name: str) -> _TensorInfo:
        return self._where[name].info[name]

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)


def _open_weights(path: str) -> _Weights:
    """The weights of checkpoint directory `path`: safetensors first (an index, one file, or all
    *.safetensors), else pytorch_model*.bin (an index, pytorch_model.bin, or all of them)."""
    path = _check_dir(path)
    for index_name, reader, pattern in ((SAFETENSORS_INDEX, _SafetensorsFile, "*.safetensors"),
                                        (BIN_INDEX, _TorchZipFile, "pytorch_model*.bin")):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                _fail(index_name, f"{index} is not an index with a weight_map ({e})")
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                _fail(index_name, f"{index} lists {missing[0]}, which is not in {path}")
            readers = {f: reader(os.path.join(path, f)) for f in files}
            for name, file in weight_map.items():
                if name not in readers[file].info:
                    _fail(name, f"{index} places it in {file}, which does not hold it")
            return _Weights(readers)
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if files:
            return _Weights({f: reader(f) for f in files})
    _fail("path", f"got {path!r}, expected *.safetensors or pytorch_model*.bin weights in it")


# ----------------------------------------------------------------------------------------------
# The mapping: official tensors <-> TNL parameters.


class _LayerParam(NamedTuple):
    """One per-layer TNL parameter: its path below the layer, its official tensors (names below
    `layers.<i>.`), and the conversions both ways (numpy; c: the TNLConfig)."""

    path: tuple[str, ...]
    official: tuple[str, ...]
    to_ours: Callable[..., np.ndarray]
    to_official: Callable[..., tuple[np.ndarray, ...]]
    shapes: Callable[[TNLConfig], tuple[tuple[int, ...], ...]]


_LAYER_PARAMS = (
    _LayerParam(
        ("mixer", "qkvu"), ("token_mixer.qkvu_proj.weight",),
        # [4 A, D], rows (q|k|v|u, head, channel) -> [D, 4, heads, head_dim]
        lambda c, w: w.reshape(4, c.num_heads, c.head_dim, c.hidden_dim).transpose(3, 0, 1, 2),
        lambda c, p: (p.transpose(1, 2, 3, 0).reshape(4 * c.attention_dim, c.hidden_dim),),
        lambda c: ((4 * c.attention_dim, c.hidden_dim),),
    ),
    _LayerParam(
        ("mixer", "out"), ("token_mixer.out_proj.weight",),
        # [D, A], columns (head, channel) -> [heads, head_dim, D]
        lambda c, w: w.T.reshape(c.num_heads, c.head_dim, c.hidden_dim),
        lambda c, p: (p.reshape(c.attention_dim, c.hidden_dim).T,),
        lambda c: ((c.hidden_dim, c.attention_dim),),
    ),
    _LayerParam(
        ("mixer", "lrpe", "theta"), ("token_mixer.lrpe.theta",),
        lambda c, w: w.reshape(c.num_heads, c.head_dim),
        lambda c, p: (p.reshape(c.num_heads, 1, c.head_dim),),
        lambda c: ((c.num_heads, 1, c.head_dim),),
    ),
    _LayerParam(
        ("glu", "w12"), ("channel_mixer.l1.weight", "channel_mixer.l2.weight"),
        # two [G, D] -> [D, 2, G]
        lambda c, w1, w2: np.stack([w1.T, w2.T], axis=1),
        lambda c, p: (p[:, 0, :].T, p[:, 1, :].T),
        lambda c: ((c.glu_dim, c.hidden_dim),) * 2,
    ),
    _LayerParam(
        ("glu", "w3"), ("channel_mixer.l3.weight",),
        lambda c, w: w.T,
        lambda c, p: (p.T,),
        lambda c: ((c.hidden_dim, c.glu_dim),),
    ),
)
_BY_PATH = {p.path: p for p in _LAYER_PARAMS}
EMBED, LM_HEAD = "embed_tokens.weight", "lm_head.weight"


def _prefix(weights: _Weights) -> str:
    """"model." as the official TransnormerForCausalLM names its tensors; "" for a bare
    TransnormerModel's state dict."""
    if "model." + EMBED in weights.names:
        return "model."
    if EMBED in weights.names:
        return ""
    _fail("model." + EMBED, "missing from the checkpoint")


def _layer_name(prefix: str, layer: int, suffix: str) -> str:
    return f"{prefix}layers.{layer}.{suffix}"


def expected_tensors(config: TNLConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Official tensor name -> shape for `config` (lm_head.weight included, also when tied)."""
    c = config
    shapes = {prefix + EMBED: (c.vocab_size, c.hidden_dim)}
    for layer in range(c.num_layers):
        for p in _LAYER_PARAMS:
            if p.path[-1] == "theta" and not c.uses_lrpe(layer):
                continue
            for suffix, shape in zip(p.official, p.shapes(c)):
                shapes[_layer_name(prefix, layer, suffix)] = shape
    shapes[LM_HEAD] = (c.vocab_size, c.hidden_dim)
    return shapes


def _stored_dtype(weights: _Weights, prefix: str) -> str:
    dtype = weights.info(prefix + EMBED).dtype
    return dtype.name if dtype.name in DTYPES else "float32"


def _check_tensors(config: TNLConfig, weights: _Weights, prefix: str, path: str) -> None:
    expected = expected_tensors(config, prefix)
    for name, shape in expected.items():
        if name not in weights.names:
            if name == LM_HEAD and config.tie_embeddings:
                continue
            _fail(name, f"missing from {path} (config.json describes {config.num_layers} layers, "
                        f"LRPE on layers {list(config.lrpe_layers)}, "
                        f"tie_word_embeddings={str(config.tie_embeddings).lower()})")
        got = weights.info(name).shape
        if got != shape:
            _fail(name, f"got shape {list(got)} in {path}, expected {list(shape)} from config.json")
    unexpected = sorted(n for n in weights.names - set(expected) if n not in _IGNORED_TENSORS)
    if unexpected:
        _fail(unexpected[0], f"unexpected in {path} for config.json's model ({len(unexpected)} unexpected "
                             f"tensors: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''})")


# ----------------------------------------------------------------------------------------------
# Loading


def _abstract_model(config: TNLConfig, mesh, rules) -> TNL:
    def build():
        return TNL(config, rngs=nnx.Rngs(0))

    if mesh is None:
        return nnx.eval_shape(build)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return nnx.eval_shape(build)


class _Placer:
    """Puts host arrays on the devices: whole on the default device without a mesh, else straight
    into the sharding their logical axes give (models/sharding.py), never whole on one device."""

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules
        self._set_layer = {}

    def sharding(self, logical, shape):
        with jax.set_mesh(self.mesh):
            return jax.sharding.NamedSharding(self.mesh, logical_to_spec(logical, shape, self.rules))

    def put(self, array: np.ndarray, logical) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        sharding = self.sharding(logical, array.shape)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def stack(self, layers: Iterator[np.ndarray], logical, shape, dtype) -> jax.Array:
        """`shape` = [count, ...] from `count` per-layer arrays, placed one at a time into a buffer in its
        final sharding (the layer axis first), so the device never holds more than it plus one layer."""
        sharding = None if self.mesh is None else self.sharding(logical, shape)
        key = (tuple(shape), jnp.dtype(dtype).name, sharding)
        if key not in self._set_layer:
            zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
            update = jax.jit(lambda b, x, i: jax.lax.dynamic_update_index_in_dim(b, x, i, 0),
                             out_shardings=sharding, donate_argnums=0)
            self._set_layer[key] = (zeros, update)
        zeros, update = self._set_layer[key]
        buffer = zeros()
        for i, layer in enumerate(layers):
            buffer = update(buffer, self.put(layer, logical[1:]), i)
        return buffer


def load_hf_tnl(path: str, *, dtype=None, mesh: jax.sharding.Mesh | None = None, config: TNLConfig | None = None,
                rules: Sequence | None = None) -> TNL:
    """A TNL with the weights of the official TransNormerLLM checkpoint directory `path`.

    dtype: the parameter and compute dtype ("bfloat16", "float16", "float32"); None: `config`'s, or
      the dtype the weights are stored in (bf16 for the published models).
    mesh: place every parameter directly in its sharding on this mesh (`make_mesh`; rules default
      `DEFAULT_RULES`) as it is read, one tensor at a time: no device ever holds the whole model
      unless the rules replicate it. None: the default device. Call the model inside
      `jax.set_mesh(mesh)`, as for `create_sharded_model`.
    config: the TNLConfig to build (e.g. with `scan_layers`, `remat`); it must have the
      checkpoint's architecture (ARCHITECTURE_FIELDS; `hf_tnl_config(path, base)` makes one).
      None: the checkpoint's, other fields at their defaults.

    Raises CheckpointFormatError naming the config.json field the TNL cannot express, the official
    name of a missing, misshapen or unexpected tensor, or ``path``.
    """
    rules = DEFAULT_RULES if rules is None else tuple(rules)
    hf = read_hf_config(path)
    with _open_weights(path) as weights:
        prefix = _prefix(weights)
        if config is None:
            config = tnl_config_from_hf(hf, dtype=_stored_dtype(weights, prefix) if dtype is None else dtype)
        else:
            check_instance("config", config, TNLConfig)
            checkpoint = tnl_config_from_hf(hf, config)
            for name in ARCHITECTURE_FIELDS:
                if getattr(config, name) != getattr(checkpoint, name):
                    _fail(name, f"got {getattr(config, name)!r} in config, the checkpoint at {path} has "
                                f"{getattr(checkpoint, name)!r}")
            if dtype is not None:
                name = _dtype_name("dtype", dtype)
                config = dataclasses.replace(config, dtype=name, param_dtype=name)
        _check_tensors(config, weights, prefix, path)
        tied_head = config.tie_embeddings and LM_HEAD in weights.names
        if tied_head and not np.array_equal(weights.read(LM_HEAD), weights.read(prefix + EMBED)):
            _fail(LM_HEAD, f"differs from {prefix + EMBED} in {path}, expected the same values with "
                           "tie_word_embeddings=true (set it to false for a separate head)")
        return _build(config, weights, prefix, mesh, rules)


def _build(config: TNLConfig, weights: _Weights, prefix: str, mesh, rules) -> TNL:
    model = _abstract_model(config, mesh, rules)
    layout = model.groups.layout
    graphdef, state = nnx.split(model)
    placer = _Placer(mesh, rules)
    param_dtype = jnp.dtype(config.param_dtype)

    def host(name):
        return weights.read(name).astype(param_dtype)  # bf16 -> bf16 keeps the bits

    for path, variable in nnx.to_flat_state(state):
        if not isinstance(variable, nnx.Param):
            _fail("/".join(map(str, path)), f"is a {type(variable).__name__}, expected only parameters in a TNL")
        shape, logical = variable.get_value().shape, variable.get_metadata().get("out_sharding")
        if path == ("embed",):
            value = placer.put(host(prefix + EMBED), logical)
        elif path == ("lm_head",):
            value = placer.put(np.ascontiguousarray(host(LM_HEAD).T), logical)
        elif path[0] == "groups" and tuple(path[2:]) in _BY_PATH:
            param = _BY_PATH[tuple(path[2:])]
            first, count = layout[path[1]]

            def layer_value(layer, param=param):
                tensors = [host(_layer_name(prefix, layer, s)) for s in param.official]
                return np.ascontiguousarray(param.to_ours(config, *tensors))

            if count == 1:
                value = placer.put(layer_value(first), logical)
            else:
                layers_ = (layer_value(layer) for layer in range(first, first + count))
                value = placer.stack(layers_, logical, shape, param_dtype)
        else:
            _fail("/".join(map(str, path)), "a TNL parameter without an official tensor")
        if value.shape != shape:  # a mapping bug, not a checkpoint problem
            raise AssertionError(f"{path}: built {value.shape}, expected {shape}")
        variable.set_value(value)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Saving


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on every process's host (an all-gather when it spans processes)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def official_tensors(model: TNL, *, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(official name, host array) of every tensor of `model`, one at a time: the embedding, layer
    by layer, then lm_head.weight (the embedding itself when tied)."""
    c = model.config
    cast = jnp.dtype(c.param_dtype if dtype is None else _dtype_name("dtype", dtype))
    params = {tuple(path): variable for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    where = {}  # layer -> (group, index in the group or None)
    for group, (first, count) in enumerate(model.groups.layout):
        for layer in range(first, first + count):
            where[layer] = (group, None if count == 1 else layer - first)

    def host(value):
        return np.ascontiguousarray(_to_host(value)).astype(cast)

    embed = host(params[("embed",)][...])
    yield "model." + EMBED, embed
    for layer in range(c.num_layers):
        group, index = where[layer]
        for param in _LAYER_PARAMS:
            variable = params.get(("groups", group, *param.path))
            if variable is None:  # LRPE off in this layer
                continue
            value = variable[...] if index is None else variable[...][index]
            for suffix, tensor in zip(param.official, param.to_official(c, host(value))):
                yield _layer_name("model.", layer, suffix), np.ascontiguousarray(tensor)
    lm_head = params.get(("lm_head",))
    yield LM_HEAD, embed if lm_head is None else np.ascontiguousarray(host(lm_head[...]).T)


def save_hf_tnl(model: TNL, path: str, *, dtype=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                overwrite: bool = False, extra_config: Mapping[str, Any] | None = None) -> None:
    """Writes `model` as an official TransNormerLLM checkpoint directory: config.json and
    safetensors weights (`model.safetensors`, or shards of at most `max_shard_bytes` with
    `model.safetensors.index.json`). The official modeling code (trust_remote_code) loads it with no
    missing or unexpected keys; `load_hf_tnl` loads it back bit for bit.

    dtype: the saved dtype (default: the parameter dtype). The tied head is written as
    `lm_head.weight` too (a copy of the embedding). Tensors come to the host one at a time; the
    host holds at most one shard. `overwrite`: replace the weight files a directory already holds
    (otherwise they are an error). `extra_config`: more config.json fields (e.g. token ids).
    Every process must call it; process 0 writes.
    """
    from safetensors.numpy import save_file

    check_instance("model", model, TNL)
    if laid_out_for_decoding(model):
        _fail("model", "got a model laid out for decoding (`generation.decoding_model`: projection weights with "
                       "their input axes last), expected the model itself (the training layout)")
    hf = hf_config_from_tnl(model.config, dtype=dtype)
    hf.update(dict(extra_config or {}))
    if not is_int(max_shard_bytes) or max_shard_bytes < 1:
        _fail("max_shard_bytes", f"got {max_shard_bytes!r}, expected a positive integer")
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        old = _weight_files(path)
        if old and not overwrite:
            _fail("path", f"{path} already holds weights ({old[:3]}), expected a new directory or overwrite=True")
        for name in old:
            os.remove(os.path.join(path, name))
    shards: list[dict[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        nonlocal current, size
        if current:
            if writer:
                save_file(current, os.path.join(path, f"shard-{len(shards):05d}.partial"), metadata={"format": "pt"})
            shards.append({name: None for name in current})
            current, size = {}, 0

    for name, tensor in official_tensors(model, dtype=dtype):
        if size and size + tensor.nbytes > max_shard_bytes:
            flush()
        current[name] = tensor if writer else None  # only process 0 keeps the bytes
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    if writer:
        count = len(shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                         for i in range(count)]
        for i, file in enumerate(names):
            os.replace(os.path.join(path, f"shard-{i:05d}.partial"), os.path.join(path, file))
        if count > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: file for file, shard in zip(names, shards) for name in shard}}
            with open(os.path.join(path, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("save_hf_tnl")


def _weight_files(path: str) -> list[str]:
    """The files in `path` a loader would read as weights (and our partial shards)."""
    patterns = ("*.safetensors", "pytorch_model*.bin", SAFETENSORS_INDEX, BIN_INDEX, "shard-*.partial")
    return sorted({os.path.basename(f) for p in patterns for f in glob.glob(os.path.join(path, p))})

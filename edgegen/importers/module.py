"""The user's own nn.Module -> an edgegen checkpoint.

Two shapes of language model are recognised by walking the module tree, as
pytorch/examples' word_language_model writes them:

    RNN LM      nn.Embedding -> nn.RNN (tanh|relu) | nn.GRU | nn.LSTM -> nn.Linear
    encoder LM  nn.Embedding (* sqrt(d)?) -> positions? -> nn.TransformerEncoder
                (causal mask) -> nn.Linear

Positions are a fixed table held as a buffer (sinusoidal, or any other table), a
second nn.Embedding, or none. The weights go into edgegen's RNN LM or GPT; the GPT
gets the KV-cached step the encoder never had. Before anything is written, the
user's own `forward`, run unchanged, is the oracle: it must be causal, and the
mapped model's logits for a whole sequence must equal its output within
TOLERANCE. A part the walk does not recognise is named in one line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgegen.checkpoint import write_model_files
from edgegen.config import GPTConfig, ModelConfig, RNNConfig
from edgegen.errors import EdgegenError, ImportModelError, first_line
from edgegen.files import write_atomically, write_json
from edgegen.importers.pretrained import SOURCE_FILE, ImportResult
from edgegen.models import GPT, RNNLM, build_model, count_parameters
from edgegen.models.gpt import Sinusoidal
from edgegen.output import claim_output
from edgegen.tokenizer import HFTokenizer, Tokenizer, vocabulary_file, word_level

TOLERANCE = 1e-4  # max |difference| of full-sequence logits (or log-probabilities)
CHECK_BATCH, CHECK_SEQ = 2, 32  # the sequences the mapping is checked on
DEFAULT_CONTEXT = 1024  # for an encoder without a position table, which has no limit
_RNNS = (nn.RNN, nn.GRU, nn.LSTM)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class Parts:
    """What the walk found, by path in the module tree."""

    embedding: tuple[str, nn.Embedding]
    head: tuple[str, nn.Linear]
    rnn: tuple[str, nn.RNNBase] | None = None
    encoder: tuple[str, nn.TransformerEncoder] | None = None
    table: tuple[str, torch.Tensor] | None = None  # a fixed position table [L, d]
    pos_embedding: tuple[str, nn.Embedding] | None = None

    @property
    def batch_first(self) -> bool:
        if self.rnn is not None:
            return self.rnn[1].batch_first
        return self.encoder[1].layers[0].self_attn.batch_first


def from_user_module(
    module: nn.Module, tokenizer: Tokenizer | str | Path | list[str]
) -> tuple[GPT | RNNLM, Tokenizer]:
    """edgegen's model holding `module`'s weights, checked against `module.forward`, and
    the tokenizer (a word list, a tokenizer.json or word-list file, or a Tokenizer)."""
    if not isinstance(module, nn.Module):
        raise ImportModelError(f"expected an nn.Module, got {type(module).__name__}")
    with _evaluating(module), torch.no_grad():
        parts = find_parts(module)
        call = ForwardCall.of(module, parts.batch_first, parts.head[1].out_features)
        check_causal(call, module)
        model = _mapped(module, parts, call)
    return model, _tokenizer(tokenizer, model.config.vocab_size)


def import_module(
    module: nn.Module,
    tokenizer: Tokenizer | str | Path | list[str],
    out: str | Path,
    force: bool = False,
    inputs: tuple[str | Path, ...] = (),
) -> ImportResult:
    """Recognise `module`, check it against its own forward, then write the checkpoint
    `out` (`inputs`: the files it came from, which `out` may not touch)."""
    out = Path(out)
    with claim_output(out, "checkpoint", inputs=inputs, force=force):
        model, tok = from_user_module(module, tokenizer)
        source = {"source": "module", "class": type(module).__qualname__}

        def fill(tmp: Path) -> None:
            write_json(tmp / SOURCE_FILE, source)
            write_model_files(tmp, model, tok)

        write_atomically(out, fill)
    return ImportResult(out, type(module).__name__, model.config, count_parameters(model))


def import_module_file(
    spec: str,
    state_dict: str | Path,
    tokenizer: str | Path,
    out: str | Path,
    init_args: str | None = None,
    force: bool = False,
) -> ImportResult:
    """`edgegen import --module FILE.py:ClassName --state-dict WEIGHTS ...`."""
    file = Path(spec.rpartition(":")[0])
    module = load_module(spec, state_dict, init_args)
    return import_module(module, tokenizer, out, force, inputs=(file, state_dict, tokenizer))


# --- the walk --------------------------------------------------------------------------


def find_parts(module: nn.Module) -> Parts:
    """Embedding, recurrent or encoder stack, optional positions and the linear head."""
    found: dict[str, list[tuple[str, Any]]] = {
        k: [] for k in ("embedding", "rnn", "encoder", "linear", "table", "stateless")
    }
    for path, child in _children(module):
        found[_kind(path, child)].append((path, _table(child) if _is_table(child) else child))
    stacks = found["rnn"] + found["encoder"]
    if len(stacks) != 1:
        what = ", ".join(p for p, _ in stacks) or "none"
        raise ImportModelError(
            f"expected one nn.RNN/nn.GRU/nn.LSTM or nn.TransformerEncoder, found {what}"
        )
    if len(found["linear"]) != 1:
        what = ", ".join(p for p, _ in found["linear"]) or "none"
        raise ImportModelError(f"expected one nn.Linear output head, found {what}")
    head = found["linear"][0]
    embedding, pos_embedding = _embeddings(found["embedding"], head[1].out_features)
    parts = Parts(embedding, head, *(found["rnn"] or [None]), *(found["encoder"] or [None]))
    if parts.rnn is not None:
        extra = found["table"][:1] or ([pos_embedding] if pos_embedding else [])
        if extra:
            raise ImportModelError(f"unknown layer {extra[0][0]}: an RNN LM has no positions")
        _check_rnn(parts)
        return parts
    if len(found["table"]) + (pos_embedding is not None) > 1:
        raise ImportModelError("more than one position table or embedding: cannot tell them apart")
    parts.table = found["table"][0] if found["table"] else None
    parts.pos_embedding = pos_embedding
    _check_encoder(parts)
    return parts


def _children(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The modules to classify: containers are looked through, nothing else is."""
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        raise ImportModelError(
            f"unknown parameter {prefix}{own[0]} outside any layer (only standard layers map)"
        )
    for name, child in module.named_children():
        if isinstance(child, _CONTAINERS):
            yield from _children(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", child


def _kind(path: str, child: nn.Module) -> str:
    kind = type(child)
    if kind is nn.Embedding:
        return "embedding"
    if kind in _RNNS:
        return "rnn"
    if kind is nn.TransformerEncoder:
        return "encoder"
    if kind is nn.Linear:
        return "linear"
    if _is_table(child):
        return "table"
    if not any(True for _ in child.parameters()) and not any(True for _ in child.buffers()):
        return "stateless"  # dropout, activations: the forward check covers what they do
    if _is_attention(path, child):
        raise ImportModelError(
            f"custom attention {path} ({kind.__name__}): only nn.MultiheadAttention inside "
            "nn.TransformerEncoderLayer maps"
        )
    raise ImportModelError(f"unknown layer {path} ({kind.__name__})")


def _is_attention(path: str, child: nn.Module) -> bool:
    names = [path.rpartition(".")[2], type(child).__name__]
    return any(word in n.lower() for n in names for word in ("attn", "attention"))


def _is_table(child: nn.Module) -> bool:
    """A module with no parameters and one float buffer (a PositionalEncoding)."""
    buffers = list(child.buffers())
    if any(True for _ in child.parameters()) or len(buffers) != 1:
        return False
    table = buffers[0]
    return table.is_floating_point() and (
        table.dim() == 2 or (table.dim() == 3 and 1 in table.shape[:2])
    )


def _table(child: nn.Module) -> torch.Tensor:
    table = next(child.buffers()).detach().float().cpu()
    return table.reshape(-1, table.shape[-1])  # (L, d): [L, 1, d] and [1, L, d] alike


def _embeddings(found, vocab: int):
    """(token embedding, position embedding or None): the token one has the head's rows."""
    tokens = [e for e in found if e[1].num_embeddings == vocab]
    if not tokens or len(found) > 2:
        what = ", ".join(p for p, _ in found) or "none"
        raise ImportModelError(
            f"expected an nn.Embedding of {vocab} rows (the head's outputs), found {what}"
        )
    others = [e for e in found if e is not tokens[0]]
    return tokens[0], (others[0] if others else None)


def _check_rnn(parts: Parts) -> None:
    path, rnn = parts.rnn
    if rnn.bidirectional:
        raise ImportModelError(
            f"bidirectional RNN {path} ({type(rnn).__name__}): it reads the future, so it "
            "has no step function; only one-direction RNNs map"
        )
    if getattr(rnn, "proj_size", 0):
        raise ImportModelError(f"unknown layer {path}: an LSTM with proj_size does not map")
    if rnn.input_size != parts.embedding[1].embedding_dim:
        raise ImportModelError(f"{path} takes {rnn.input_size} inputs, not the embedding's")
    if parts.head[1].in_features != rnn.hidden_size:
        raise ImportModelError(f"{parts.head[0]} does not read {path}'s {rnn.hidden_size} outputs")


def _check_encoder(parts: Parts) -> None:
    path, encoder = parts.encoder
    layers = list(encoder.layers)
    dim = parts.embedding[1].embedding_dim
    for i, layer in enumerate(layers):
        where = f"{path}.layers.{i}"
        if type(layer) is not nn.TransformerEncoderLayer:
            raise ImportModelError(f"unknown layer {where} ({type(layer).__name__})")
        attn = layer.self_attn
        if type(attn) is not nn.MultiheadAttention:
            raise ImportModelError(
                f"custom attention {where}.self_attn ({type(attn).__name__}): only "
                "nn.MultiheadAttention maps"
            )
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise ImportModelError(
                f"{where}.self_attn: separate key/value sizes, bias_k/bias_v or add_zero_attn "
                "do not map"
            )
        for name in ("norm1", "norm2"):
            if type(getattr(layer, name)) is not nn.LayerNorm:
                raise ImportModelError(f"unknown layer {where}.{name}")
        _activation(layer, where)
        if layer.self_attn.embed_dim != dim or layer.norm_first != layers[0].norm_first:
            raise ImportModelError(f"{where} differs from the embedding or the other layers")
    if encoder.norm is not None and type(encoder.norm) is not nn.LayerNorm:
        raise ImportModelError(f"unknown layer {path}.norm ({type(encoder.norm).__name__})")
    if parts.table is not None and parts.table[1].shape[1] != dim:
        raise ImportModelError(f"{parts.table[0]}'s table is not {dim} wide")
    if parts.head[1].in_features != dim:
        raise ImportModelError(f"{parts.head[0]} does not read {dim} features")


def _activation(layer: nn.TransformerEncoderLayer, where: str) -> str:
    act = layer.activation
    if act is nn.functional.relu or type(act) is nn.ReLU:
        return "relu"
    if act is nn.functional.gelu or (type(act) is nn.GELU and act.approximate == "none"):
        return "gelu"
    if type(act) is nn.GELU and act.approximate == "tanh":
        return "gelu_tanh"
    raise ImportModelError(f"unknown activation in {where}: {act!r}")


# --- the mapping -----------------------------------------------------------------------


def _mapped(module: nn.Module, parts: Parts, call: ForwardCall) -> GPT | RNNLM:
    """The edgegen model whose full-sequence logits equal the user's forward within
    TOLERANCE. An encoder's embedding scale shows only in its forward: of the usual
    two (1 and sqrt(d)), the one that matches."""
    if parts.rnn is not None:
        candidates = [_load(rnn_config(parts), rnn_tensors(parts))]
    else:
        config = gpt_config(parts)
        scales = (1.0, math.sqrt(config.dim))
        configs = [dataclasses.replace(config, embed_scale=scale) for scale in scales]
        candidates = [_load(c, gpt_tensors(parts)) for c in configs]
    diff, model = min(((mapping_difference(call, m), m) for m in candidates), key=lambda x: x[0])
    if not diff <= TOLERANCE:
        raise ImportModelError(
            f"{type(module).__name__}.forward differs from its mapping by {diff:.1e} "
            f"(tolerance {TOLERANCE:.0e}): its forward does something its layers do not show"
        )
    return model


def rnn_config(parts: Parts) -> RNNConfig:
    rnn, head = parts.rnn[1], parts.head[1]
    cell = {nn.RNN: "rnn", nn.GRU: "gru", nn.LSTM: "lstm"}[type(rnn)]
    return RNNConfig(
        vocab_size=head.out_features,
        cell=cell,
        nonlinearity=rnn.nonlinearity if cell == "rnn" else "tanh",
        dim=rnn.input_size,
        hidden_size=rnn.hidden_size,
        n_layers=rnn.num_layers,
        tie_embeddings=head.weight is parts.embedding[1].weight,
    )


def rnn_tensors(parts: Parts) -> dict[str, torch.Tensor]:
    rnn, head = parts.rnn[1], parts.head[1]
    out = {"embed.weight": parts.embedding[1].weight, "head.weight": head.weight}
    out["head.bias"] = _bias(head.bias, head.out_features)
    gates = rnn.weight_ih_l0.shape[0]
    for k in range(rnn.num_layers):
        for part in ("ih", "hh"):
            out[f"rnn.weight_{part}_l{k}"] = getattr(rnn, f"weight_{part}_l{k}")
            out[f"rnn.bias_{part}_l{k}"] = _bias(getattr(rnn, f"bias_{part}_l{k}", None), gates)
    return out


def gpt_config(parts: Parts) -> GPTConfig:
    encoder, head, embedding = parts.encoder[1], parts.head[1], parts.embedding[1]
    first = encoder.layers[0]
    if parts.table is not None:
        table = parts.table[1]
        sinusoidal = _is_sinusoidal(table)
        pos, context = ("sinusoidal" if sinusoidal else "learned"), table.shape[0]
    elif parts.pos_embedding is not None:
        pos, context = "learned", parts.pos_embedding[1].num_embeddings
    else:
        pos, context = "none", DEFAULT_CONTEXT
    return GPTConfig(
        vocab_size=head.out_features,
        dim=embedding.embedding_dim,
        n_layers=len(encoder.layers),
        n_heads=first.self_attn.num_heads,
        max_seq_len=context,
        hidden_dim=first.linear1.out_features,
        activation=_activation(first, parts.encoder[0]),
        norm_position="pre" if first.norm_first else "post",
        final_norm=encoder.norm is not None,
        bias=True,
        head_bias=head.bias is not None,
        pos_encoding=pos,
        tie_embeddings=head.weight is embedding.weight,
        norm_eps=first.norm1.eps,
    )


def gpt_tensors(parts: Parts) -> dict[str, torch.Tensor]:
    """edgegen GPT names <- nn.TransformerEncoder names (QKV stays packed, as in_proj)."""
    encoder, head, embedding = parts.encoder[1], parts.head[1], parts.embedding[1]
    dim = embedding.embedding_dim
    out = {"tok_emb.weight": embedding.weight, "head.weight": head.weight}
    if head.bias is not None:
        out["head.bias"] = head.bias
    if parts.pos_embedding is not None:
        out["pos_emb.weight"] = parts.pos_embedding[1].weight
    elif parts.table is not None and not _is_sinusoidal(parts.table[1]):
        out["pos_emb.weight"] = parts.table[1]
    norms = {"norm": encoder.norm} if encoder.norm is not None else {}
    for i, layer in enumerate(encoder.layers):
        attn = layer.self_attn
        p = f"blocks.{i}."
        norms.update({p + "norm1": layer.norm1, p + "norm2": layer.norm2})
        linears = {
            p + "attn.qkv": (attn.in_proj_weight, attn.in_proj_bias),
            p + "attn.proj": (attn.out_proj.weight, attn.out_proj.bias),
            p + "mlp.fc": (layer.linear1.weight, layer.linear1.bias),
            p + "mlp.proj": (layer.linear2.weight, layer.linear2.bias),
        }
        for name, (weight, bias) in linears.items():
            out[name + ".weight"], out[name + ".bias"] = weight, _bias(bias, weight.shape[0])
    for name, norm in norms.items():
        out[name + ".weight"], out[name + ".bias"] = norm.weight, _bias(norm.bias, dim)
    return out


def _bias(bias: torch.Tensor | None, size: int) -> torch.Tensor:
    return torch.zeros(size) if bias is None else bias


def _is_sinusoidal(table: torch.Tensor) -> bool:
    positions = torch.arange(table.shape[0])[None]
    return torch.allclose(Sinusoidal(table.shape[1])(positions)[0], table, atol=1e-5)


def _load(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> GPT | RNNLM:
    model = build_model(config)
    state = {k: v.detach().float().cpu() for k, v in tensors.items()}
    if config.tie_embeddings:
        state["head.weight"] = state.get("tok_emb.weight", state.get("embed.weight"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # a mapping bug, not the user's input
        raise ImportModelError(f"internal mapping error: missing {missing}, extra {unexpected}")
    return model.eval()


# --- the user's forward, the oracle ----------------------------------------------------


@dataclass
class ForwardCall:
    """Calls the user's forward as it expects and returns logits [B, T, V]: input
    sequence-first or batch-first, `init_hidden(batch)` when forward wants a hidden
    state, output logits or (logits, hidden), whole or flattened to [T*B, V]."""

    module: nn.Module
    batch_first: bool
    vocab: int
    needs_hidden: bool

    @classmethod
    def of(cls, module: nn.Module, batch_first: bool, vocab: int) -> ForwardCall:
        try:
            params = inspect.signature(module.forward).parameters.values()
        except (TypeError, ValueError):
            params = []
        required = [
            p
            for p in params
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        needs_hidden = len(required) > 1
        if needs_hidden and not callable(getattr(module, "init_hidden", None)):
            raise ImportModelError(
                f"{type(module).__name__}.forward takes {len(required)} arguments but the "
                "module has no init_hidden(batch) to make the second"
            )
        return cls(module, batch_first, vocab, needs_hidden)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        device = next(self.module.parameters()).device
        x = (ids if self.batch_first else ids.t()).contiguous().to(device)
        args = (x, self.module.init_hidden(B)) if self.needs_hidden else (x,)
        try:
            out = self.module(*args)
        except Exception as e:
            raise ImportModelError(
                f"{type(self.module).__name__}.forward failed: {first_line(e)}"
            ) from None
        if isinstance(out, tuple | list):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.numel() != B * T * self.vocab:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ImportModelError(
                f"{type(self.module).__name__}.forward returned {shape}, not logits for "
                f"{T} positions x {B} rows x {self.vocab} words"
            )
        if self.batch_first:
            return out.reshape(B, T, self.vocab).float().cpu()
        return out.reshape(T, B, self.vocab).transpose(0, 1).float().cpu()


def check_causal(call: ForwardCall, module: nn.Module) -> None:
    """Outputs must not change when later tokens do: an encoder without a causal mask
    (or anything else that reads ahead) has no step function."""
    ids = _check_ids(call.vocab)
    half = ids.shape[1] // 2
    changed = ids.clone()
    changed[:, half:] = (changed[:, half:] + 1) % call.vocab
    diff = (call(ids)[:, :half] - call(changed)[:, :half]).abs().max().item()
    if not diff <= TOLERANCE:
        raise ImportModelError(
            f"{type(module).__name__} is not causal: its output at earlier positions changes "
            f"with later tokens (by {diff:.1e}); is the causal mask missing?"
        )


def mapping_difference(call: ForwardCall, model: GPT | RNNLM) -> float:
    """Max |difference| of full-sequence logits between the user's forward and `model`
    (of log-probabilities when the forward returns those, as word_language_model's do)."""
    ids = _check_ids(call.vocab, getattr(model.config, "max_seq_len", CHECK_SEQ))
    want = call(ids)
    got = model(ids)[0]
    if torch.allclose(want.logsumexp(-1), torch.zeros(()), atol=TOLERANCE):
        got = torch.log_softmax(got, dim=-1)
    return (want - got).abs().max().item()


def _check_ids(vocab: int, context: int = CHECK_SEQ) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (CHECK_BATCH, min(CHECK_SEQ, context)), generator=gen)


@contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the check; the module's own mode is restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# --- inputs ----------------------------------------------------------------------------


def _tokenizer(tokenizer, vocab_size: int) -> Tokenizer:
    try:
        if isinstance(tokenizer, str | Path):
            return vocabulary_file(Path(tokenizer), vocab_size)
        if isinstance(tokenizer, list | tuple):
            return word_level(list(tokenizer), vocab_size)
    except EdgegenError as e:
        raise ImportModelError(f"tokenizer: {e}") from None
    if isinstance(tokenizer, HFTokenizer) or getattr(tokenizer, "type", None) == "byte":
        if tokenizer.vocab_size > vocab_size:
            raise ImportModelError(
                f"tokenizer has {tokenizer.vocab_size} ids, the model {vocab_size} rows"
            )
        return tokenizer
    raise ImportModelError(
        "tokenizer must be a word list, a tokenizer.json or word-list file, or a Tokenizer"
    )


def load_module(spec: str, state_dict: str | Path, init_args: str | None = None) -> nn.Module:
    """`FILE.py:ClassName` built with `init_args` (a JSON list or object), holding the
    weights of `state_dict` (torch.load with weights_only=True, or safetensors)."""
    cls = _load_class(spec)
    args, kwargs = _init_args(init_args)
    try:
        module = cls(*args, **kwargs)
    except Exception as e:
        raise ImportModelError(
            f"{cls.__name__}({init_args or ''}) failed: {first_line(e)}"
        ) from None
    if not isinstance(module, nn.Module):
        raise ImportModelError(f"{spec} is not an nn.Module")
    weights = read_state_dict(Path(state_dict))
    try:
        missing, unexpected = module.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # sizes that differ: torch lists them one per line
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ImportModelError(
            f"{state_dict} does not fit {cls.__name__}: {'; '.join(lines[:2])}"
        ) from None
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:3])}"] * bool(missing)
        parts += [f"unexpected {', '.join(unexpected[:3])}"] * bool(unexpected)
        raise ImportModelError(f"{state_dict} does not fit {cls.__name__}: {'; '.join(parts)}")
    return module


def _load_class(spec: str) -> type:
    file, sep, name = spec.rpartition(":")
    if not sep or not file or not name.isidentifier():
        raise ImportModelError(f"--module must look like FILE.py:ClassName, got {spec!r}")
    path = Path(file)
    if not path.is_file():
        raise ImportModelError(f"{file} not found")
    loader = importlib.util.spec_from_file_location(f"edgegen_user_{path.stem}", path)
    if loader is None or loader.loader is None:
        raise ImportModelError(f"{file} is not a Python file")
    source = importlib.util.module_from_spec(loader)
    sys.path.insert(0, str(path.parent.resolve()))  # its own imports of its neighbours
    sys.modules[loader.name] = source  # dataclasses (and pickle) look their module up there
    try:
        loader.loader.exec_module(source)
    except Exception as e:
        sys.modules.pop(loader.name, None)
        raise ImportModelError(f"cannot load {file}: {type(e).__name__}: {first_line(e)}") from None
    finally:
        sys.path.remove(str(path.parent.resolve()))
    cls = getattr(source, name, None)
    if not isinstance(cls, type):
        raise ImportModelError(f"{file} defines no class {name}")
    return cls


def _init_args(text: str | None) -> tuple[list, dict]:
    if text is None:
        return [], {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ImportModelError(f"--init-args is not JSON: {e}") from None
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    raise ImportModelError("--init-args must be a JSON list (positional) or object (keywords)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by name, unpickling nothing but tensors (safetensors, or torch.load with
    weights_only=True). A whole pickled module is refused: save its state_dict()."""
    if not path.is_file():
        raise ImportModelError(f"{path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ImportModelError(f"cannot read {path}: {first_line(e)}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ImportModelError(
            f"cannot read {path} as a state dict (torch.load with weights_only=True: "
            f"{first_line(e)}); save model.state_dict() rather than the model"
        ) from None
    if isinstance(data, dict) and set(data) <= {"state_dict", "model"} and len(data) == 1:
        data = next(iter(data.values()))  # {"state_dict": {...}}, as training scripts save
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ImportModelError(f"{path} holds no state dict (a mapping of names to tensors)")
    return data

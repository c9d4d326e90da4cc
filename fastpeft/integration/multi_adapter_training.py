"""Training many LoRA adapters of one PEFT model at once, in mixed batches over the one frozen base.

``train_adapters(peft_model, ["a", "b", "c"], lr=...)`` accelerates the model (:func:`~fastpeft.accelerate`) if it is
not, makes exactly those adapters trainable (every other parameter frozen) and returns one optimizer parameter group
per adapter (its own ``lr`` / ``weight_decay``; the group's ``"adapter"`` entry names it). Then, in training mode,
``model(input_ids, attention_mask=..., labels=..., adapter_names=names)`` (``names[b]``: row ``b``'s adapter, or
``"__base__"``) runs every row with its adapter, where PEFT refuses ``adapter_names`` in training:

- the loss is ``Σ_k loss_k``, ``loss_k`` the model's own loss function (what it computes from ``labels``) over the
  rows of adapter ``k`` alone, and each adapter's loss is also ``out.adapter_losses[k]``. Rows are independent in a
  causal LM, so ``loss.backward()`` gives adapter ``k`` exactly the gradient of ``loss_k``: what PEFT training it
  alone on its rows gives. ``"__base__"`` rows train nothing and are left out of the loss.
- each adapted layer runs the base once for the whole batch and adds every row's LoRA term through the multi-LoRA
  training op (:mod:`fastpeft.ops.multi_lora_train`, the ``adapter_names=`` training path of
  :mod:`fastpeft.integration.fused_forward`); a DoRA adapter's rows run through the DoRA op on those rows, whose
  output replaces the base's there. An adapter with no row in a batch gets no gradient (``None``), so AdamW leaves
  it alone at that step, as PEFT training it alone would not step it.
- dropout: each adapter's own rate, its mask drawn on its rows in the shape PEFT draws it for them. With
  ``dropout_seeds={name: seed}`` each adapter draws from its own generator so seeded, and a run draws exactly the
  masks PEFT draws training that adapter alone after ``torch.manual_seed(seed)``; without, from the global RNG.
- gradient checkpointing (``model.gradient_checkpointing_enable()``): the recomputed layers see the same
  ``adapter_names`` and redraw the same masks (each adapter generator's state is replayed, as
  ``torch.utils.checkpoint`` replays the global one).
- ``torch.compile``: the training path of each adapted layer runs eagerly, outside the graph (counted in
  :data:`COMPILE_FALLBACKS`), so a compiled model computes what the eager one does.

The same without peft: :meth:`fastpeft.MultiLoraModel.train_adapters` (LoRA adapters, the same op and loss).
"""

from __future__ import annotations

import collections
import contextlib
from functools import partial
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..nn.dora import dora_dropout
from ..ops.dora import dora_linear
from ..ops.lora import lora_linear
from ..ops.multi_lora_train import AdapterDropout, dropout_mask, multi_lora_train_term
from .layer_classes import fast_class, is_accelerated
from .peft_paths import base_weight, dropout_active, mixed_batch_adapters, model_call, rows_meta

__all__ = ["train_adapters", "COMPILE_FALLBACKS"]

#: adapted-layer calls of the mixed-batch training path made from ``torch.compile``-d code and run eagerly
COMPILE_FALLBACKS: collections.Counter = collections.Counter()

_GENERATORS_KEY = "_fastpeft_dropout_generators"  # a LoRA layer's ``__dict__`` entry: {adapter: torch.Generator}
PerAdapter = Union[float, Mapping[str, float]]


def _per_adapter(value: PerAdapter, names: Sequence[str], what: str) -> dict:
    if isinstance(value, Mapping):
        missing, extra = set(names) - set(value), set(value) - set(names)
        if missing or extra:
            raise ValueError(f"{what} per adapter must name exactly {list(names)}: missing {sorted(missing)}, "
                             f"unknown {sorted(extra)}")
        return {name: float(value[name]) for name in names}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number or {{adapter: number}}, got {value!r}")
    return {name: float(value) for name in names}


def _lora_layers(model: nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _adapter_parameters(layer, name: str) -> list:
    params = []
    for table in ("lora_A", "lora_B", "lora_magnitude_vector"):
        modules = getattr(layer, table, None)
        if modules is not None and name in modules:
            params.extend(modules[name].parameters())
    return params


def train_adapters(model: nn.Module, adapter_names: Sequence[str], lr: PerAdapter, weight_decay: PerAdapter = 0.0,
                   dropout_seeds: Optional[Mapping[str, int]] = None) -> list:
    """Make the LoRA / DoRA adapters ``adapter_names`` of the PEFT causal LM ``model`` trainable together in mixed
    batches (see the module docstring) and return their optimizer parameter groups, one per adapter in the given
    order: ``{"params": [...], "lr": ..., "weight_decay": ..., "adapter": name}`` (``lr`` / ``weight_decay`` a number
    for all, or ``{name: number}`` naming each). Every other parameter of the model is frozen. ``dropout_seeds``:
    ``{name: seed}`` for adapters whose dropout masks come from their own generator (default: the global RNG).
    Raises ``ValueError`` / ``TypeError`` before changing anything for a model that is not a PEFT causal LM, an
    unknown or non-LoRA adapter, or bad ``lr`` / ``weight_decay`` / ``dropout_seeds``."""
    try:
        from peft import PeftModel
    except ImportError:
        raise TypeError("train_adapters takes a PEFT model: peft is not installed") from None
    base = model.get_base_model() if isinstance(model, PeftModel) else None
    # the per-adapter loss is the causal LM's own loss function over the adapter's rows
    if base is None or not type(base).__name__.endswith("ForCausalLM") or not hasattr(base, "loss_function"):
        raise TypeError(f"train_adapters takes a PEFT model (peft.get_peft_model) of a Hugging Face causal LM "
                        f"(a ...ForCausalLM), got {type(model).__name__}"
                        + ("" if base is None else f" over {type(base).__name__}"))
    if isinstance(adapter_names, str) or not adapter_names:
        raise ValueError(f"adapter_names must be a non-empty list of adapter names, got {adapter_names!r}")
    names = list(adapter_names)
    if len(set(names)) != len(names):
        raise ValueError(f"adapter_names names an adapter twice: {names}")
    configs = model.peft_config
    for name in names:
        if name == "__base__" or name not in configs:
            raise ValueError(f"unknown adapter {name!r}; the model holds {sorted(configs)}")
        peft_type = str(getattr(configs[name].peft_type, "value", configs[name].peft_type))
        if peft_type != "LORA":
            raise ValueError(f"adapter {name!r} is {peft_type}: train_adapters trains LoRA / DoRA adapters")
    lrs, decays = _per_adapter(lr, names, "lr"), _per_adapter(weight_decay, names, "weight_decay")
    seeds = dict(dropout_seeds or {})
    unknown = set(seeds) - set(names)
    if unknown:
        raise ValueError(f"dropout_seeds names adapters not trained here: {sorted(unknown)}")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds.values()):
        raise TypeError(f"dropout_seeds must map adapter names to int seeds, got {seeds}")

    from .accelerate import accelerate

    layers = _lora_layers(model)
    if not any(is_accelerated(layer) for layer in layers):
        accelerate(model)
    for param in model.parameters():
        param.requires_grad_(False)
    groups = {name: [] for name in names}
    device = next(model.parameters()).device
    generators = {name: torch.Generator(device=device).manual_seed(seed) for name, seed in seeds.items()}
    for layer in layers:
        for name in names:
            params = _adapter_parameters(layer, name)
            for param in params:
                param.requires_grad_(True)
            groups[name].extend(params)
        layer.__dict__[_GENERATORS_KEY] = generators
    if not is_accelerated(model):
        model.__class__ = fast_class(type(model), "mixed-training", _peft_model_forward)
    _eager_fallback()
    return [{"params": groups[name], "lr": lrs[name], "weight_decay": decays[name], "adapter": name}
            for name in names]


def dropout_generator(layer, name: str) -> Optional[torch.Generator]:
    """The generator adapter ``name``'s dropout masks come from in ``layer`` (None: the global RNG)."""
    generators = layer.__dict__.get(_GENERATORS_KEY)
    return None if generators is None else generators.get(name)


# ----------------------------------------------------------------------------------------------- the model call
def _peft_model_forward(self, *args, **kwargs):
    """The forward of a PEFT causal LM that :func:`train_adapters` prepared: PEFT's own, except for
    ``adapter_names=`` in training mode (the module docstring)."""
    if kwargs.get("adapter_names") is None or not self.training:
        return self._fastpeft_peft_class.forward(self, *args, **kwargs)
    return _mixed_training_call(self, *args, **kwargs)


def _check_names(model, adapter_names, rows: Optional[int]) -> None:
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"adapter_names takes one adapter name per row (a list), got {adapter_names!r}")
    if rows is not None and len(adapter_names) != rows:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for an input of {rows} rows")
    known = set(model.peft_config)
    unknown = sorted({n for n in adapter_names if n != "__base__" and n not in known})
    if unknown:
        raise ValueError(f"unknown adapters in adapter_names: {unknown}; the model holds {sorted(known)}")


def _mixed_training_call(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, *,
                         adapter_names, **kwargs):
    inputs = input_ids if input_ids is not None else inputs_embeds
    _check_names(self, adapter_names, None if inputs is None else inputs.shape[0])
    adapter_names = list(adapter_names)
    base = self.get_base_model()
    with _adapter_names_hooks(base, adapter_names):
        out = base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
    return with_adapter_losses(base, out, labels, adapter_names)


def with_adapter_losses(causal_lm: nn.Module, out, labels: Optional[torch.Tensor], adapter_names, base_name="__base__"):
    """``out`` (the causal LM's output for a mixed batch, without labels) with ``out.adapter_losses`` ``{adapter:
    the model's own loss function over that adapter's rows}`` and ``out.loss`` their sum (None when no row names an
    adapter), rows named ``base_name`` left out; ``out`` as it is when ``labels`` is None."""
    if labels is None:
        return out
    vocab_size = causal_lm.config.get_text_config().vocab_size
    losses = {}
    for name in sorted({n for n in adapter_names if n != base_name}):
        rows = torch.tensor([b for b, n in enumerate(adapter_names) if n == name], device=labels.device)
        losses[name] = causal_lm.loss_function(logits=out.logits.index_select(0, rows.to(out.logits.device)),
                                               labels=labels.index_select(0, rows), vocab_size=vocab_size)
    out.loss = torch.stack(list(losses.values())).sum() if losses else None
    out.adapter_losses = losses
    return out


def _peft_hook():
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook

    return _adapter_names_pre_forward_hook


@contextlib.contextmanager
def _adapter_names_hooks(base: nn.Module, adapter_names: list):
    """For the duration: every LoRA layer of ``base`` called with ``adapter_names=`` (PEFT's own pre-forward hook,
    so :mod:`~fastpeft.integration.peft_paths` sees the model call), and every gradient-checkpointed layer's
    checkpoint function wrapped so its recompute in backward does so too, with the same dropout masks."""
    hook = partial(_peft_hook(), adapter_names=adapter_names)
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in _lora_layers(base)]
    checkpointed = [m for m in base.modules()
                    if getattr(m, "gradient_checkpointing", False) is True and "_gradient_checkpointing_func" in m.__dict__]
    for module in checkpointed:
        module._gradient_checkpointing_func = partial(_checkpoint_with_names, module._gradient_checkpointing_func,
                                                      module, adapter_names)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in checkpointed:
            module._gradient_checkpointing_func = module._gradient_checkpointing_func.args[0]


def _checkpoint_with_names(checkpoint, module: nn.Module, adapter_names: list, function, *args, **kwargs):
    """``checkpoint(function, *args, **kwargs)`` with ``function`` run (forward and recompute) as
    :class:`_ReplayNames` runs it."""
    return checkpoint(_ReplayNames(function, module, adapter_names), *args, **kwargs)


class _ReplayNames:
    """A checkpointed layer's function whose every call runs its LoRA layers with ``adapter_names``; its calls after
    the first (the recompute in backward) set the adapters' dropout generators to their states at the first call,
    and back after it."""

    def __init__(self, function, module: nn.Module, adapter_names: list):
        self.function, self.adapter_names = function, adapter_names
        self.layers = _lora_layers(module)
        generators = {}
        for layer in self.layers:
            generators.update({id(g): g for g in (layer.__dict__.get(_GENERATORS_KEY) or {}).values()})
        self.generators = list(generators.values())
        self.states = None

    def __call__(self, *args, **kwargs):
        hook = partial(_peft_hook(), adapter_names=self.adapter_names)
        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in self.layers]
        replay = self.states is not None
        current = [g.get_state() for g in self.generators]
        if replay:
            for g, state in zip(self.generators, self.states):
                g.set_state(state)
        else:
            self.states = current
        try:
            return self.function(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            if replay:
                for g, state in zip(self.generators, current):
                    g.set_state(state)


# ------------------------------------------------------------------------------------------ one adapted layer
def mixed_training_call(layer, x: torch.Tensor, names: Sequence[str]) -> bool:
    """Whether a call of a PEFT LoRA layer with ``adapter_names=`` naming its adapters ``names`` trains: autograd
    records and ``x`` or a factor of one of them requires a gradient, or the layer is in training mode with one of
    them trainable (also without grad: the first pass of a reentrant checkpoint, whose recompute must see the same
    forward, dropout masks included)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return True
    if not (torch.is_grad_enabled() or layer.training):
        return False
    return any(p.requires_grad for name in names for p in _adapter_parameters(layer, name))


def mixed_training_reason(layer, x: torch.Tensor, adapter_names, names: Sequence[str]) -> Optional[str]:
    """Why :func:`mixed_training_lora` does not compute PEFT's mixed-batch forward (with its gradients) at this
    training call, or None: ``adapter_names`` not one per row, autocast, ``lora_bias``, a dropout module other than
    ``nn.Dropout``, LoRA adapters of different dtypes."""

    if isinstance(adapter_names, str) or x.dim() < 2 or len(adapter_names) != len(x):
        return "adapter_names is not one entry per row"
    if torch.is_autocast_enabled(x.device.type):
        return "adapter_names in training under autocast"
    for name in names:
        if layer.lora_bias.get(name, False):
            return f"adapter_names in training naming adapter {name!r} with lora_bias"
        dropout = layer.lora_dropout[name]
        if dropout_active(dropout) and type(dropout) is not nn.Dropout:
            return f"adapter {name!r}: dropout module {type(dropout).__name__} is not torch.nn.Dropout"
    dtypes = {p.dtype for name in names if name not in layer.lora_variant for p in _adapter_parameters(layer, name)}
    if len(dtypes) > 1:
        return "adapter_names in training naming LoRA adapters of different dtypes"
    return None


def _dropout_rate(layer, name: str) -> float:

    dropout = layer.lora_dropout[name]
    return dropout.p if dropout_active(dropout) else 0.0


def mixed_training_lora(layer, x: torch.Tensor, adapter_names) -> torch.Tensor:
    """PEFT's mixed-batch forward of a PEFT LoRA layer in training (where :func:`mixed_training_reason` is None),
    differentiable: the base op once over ``x`` ``(B, ..., in)``, every LoRA adapter's term on its rows by the
    multi-LoRA training op, and each DoRA adapter's rows replaced by the DoRA op over them."""
    if torch.compiler.is_compiling():
        return _eager_fallback()(layer, x, adapter_names)
    return _mixed_training_lora(layer, x, adapter_names)


# [the torch.compiler.disable wrapper of _counted_mixed_training_lora], made on first use: making it imports dynamo
# (and triton), which importing fastpeft must not
_EAGER_FALLBACK: list = []


def _eager_fallback():
    """:func:`_counted_mixed_training_lora` outside any graph (``torch.compiler.disable``): dynamo breaks the graph
    around each call and runs it eagerly. :func:`train_adapters` makes it, eagerly, before any compiled call."""
    if not _EAGER_FALLBACK:
        _EAGER_FALLBACK.append(torch.compiler.disable(_counted_mixed_training_lora))
    return _EAGER_FALLBACK[0]


def _counted_mixed_training_lora(layer, x, adapter_names):
    COMPILE_FALLBACKS["mixed-batch training layer call"] += 1
    return _mixed_training_lora(layer, x, adapter_names)


def _mixed_training_lora(layer, x, adapter_names):

    named = mixed_batch_adapters(layer, adapter_names)
    weight, bias = base_weight(layer), layer.base_layer.bias
    lora_names = tuple(name for name in named if name not in layer.lora_variant)
    if len(named) == 1 and lora_names and all(n == named[0] for n in adapter_names):
        return _one_adapter(layer, x, weight, bias, named[0])
    y = lora_linear(x, weight, bias, None, None, 0.0)
    if lora_names:
        slot = {name: k for k, name in enumerate(lora_names)}
        row_ids = tuple(slot.get(name, -1) for name in adapter_names)
        meta = rows_meta(model_call(layer), row_ids, tuple(x.shape[:-1]), x.device)
        dropouts = [AdapterDropout(_dropout_rate(layer, name), dropout_generator(layer, name)) for name in lora_names]
        delta = multi_lora_train_term(x.reshape(-1, x.shape[-1]), [layer.lora_A[n].weight for n in lora_names],
                                      [layer.lora_B[n].weight for n in lora_names],
                                      [layer.scaling[n] for n in lora_names], meta, dropouts)
        y = y + delta.to(y.dtype).reshape(y.shape)
    for name in named:
        if name not in lora_names:
            rows = torch.tensor([b for b, n in enumerate(adapter_names) if n == name], device=x.device)
            x_rows = x.index_select(0, rows)
            lora_a = layer.lora_A[name].weight
            generator, p = dropout_generator(layer, name), _dropout_rate(layer, name)
            if generator is not None and p > 0.0:
                x_dropped = x_rows.to(lora_a.dtype) * dropout_mask(x_rows.shape, p, lora_a.dtype, x.device, generator)
            else:
                x_dropped = dora_dropout(layer.lora_dropout[name], x_rows, lora_a.dtype, layer.training)
            y_rows = dora_linear(x_rows, weight, bias, lora_a, layer.lora_B[name].weight, layer.scaling[name],
                                 layer.lora_magnitude_vector[name].weight, x_dropped)
            y = y.index_copy(0, rows, y_rows.to(y.dtype))
    return y


def _one_adapter(layer, x, weight, bias, name: str):
    """Every row with LoRA adapter ``name``: the one-adapter LoRA op (the base and the term in one fused call), its
    mask drawn on ``x`` as the multi-LoRA op draws it for one adapter's tokens (all of them, in batch order)."""

    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    generator, p = dropout_generator(layer, name), _dropout_rate(layer, name)
    x_dropped, dropout_p = None, 0.0
    if p > 0.0 and (generator is not None or not x.is_contiguous()):
        x_dropped = x.to(lora_a.dtype) * dropout_mask(x.shape, p, lora_a.dtype, x.device, generator)
    elif p > 0.0:
        dropout_p = p  # the op draws F.dropout's mask on contiguous x from the global RNG: the same draw
    return lora_linear(x, weight, bias, lora_a, lora_b, layer.scaling[name], x_dropped, dropout_p)

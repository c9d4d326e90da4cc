"""What fastpeft did to a model and what of it trains: :class:`PatchSummary`, the report of
:func:`~fastpeft.accelerate`, :func:`~fastpeft.inject` and :func:`~fastpeft.load_model_adapter`, and PEFT's
trainable-parameter count for any model."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["PatchSummary", "trainable_parameters", "print_trainable_parameters"]


@dataclass
class PatchSummary:
    """What :func:`~fastpeft.accelerate`, :func:`~fastpeft.inject` or :func:`~fastpeft.load_model_adapter` did:
    ``replaced`` maps each module path it switched to fastpeft to the kind (``lora``, ``dora``, ``ia3``,
    ``adalora``, with ``+nf4`` over a 4-bit base; ``nf4`` for a frozen 4-bit layer no PEFT layer wraps);
    ``skipped`` maps each adapted or targeted layer it left alone to the reason; ``peft_forward`` maps each switched
    layer holding adapters fastpeft does not fuse to the reason (the layer runs PEFT's forward while such an
    adapter is active); ``removed`` maps each layer of a previously loaded adapter that the new one does not adapt
    to its kind (:func:`~fastpeft.load_model_adapter` put its base layer back); ``unfused`` maps each switched
    layer whose calls will run PEFT's forward on this model's activations to the reason (a 4-bit base computing in
    another dtype than the model's: the fused ops compute in the input's dtype). The text counts on fastpeft ops
    only the switched layers not in ``unfused``."""

    replaced: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    peft_forward: dict = field(default_factory=dict)
    removed: dict = field(default_factory=dict)
    unfused: dict = field(default_factory=dict)

    def __str__(self) -> str:
        kinds: dict = {}
        for name, kind in self.replaced.items():
            if name not in self.unfused:
                kinds[kind] = kinds.get(kind, 0) + 1
        done = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        text = f"fastpeft: {len(self.replaced) - len(self.unfused)} layers on fastpeft ops ({done})"
        if self.unfused:
            text += f"; {len(self.unfused)} switched but running PEFT's forward on this model's activations"
        text += f"; {len(self.skipped)} left as they are"
        if self.removed:
            text += f"; {len(self.removed)} layers of the previous adapter back to their base layer"
        reasons: dict = {}
        for name, why in self.unfused.items():
            reasons.setdefault(why, []).append(name)
        text += "".join(f"\n  {len(names)} layers ({names[0]}{', ...' if len(names) > 1 else ''}): PEFT's forward: "
                        f"{why}" for why, names in reasons.items())
        text += "".join(f"\n  {name}: PEFT's forward while active: {why}" for name, why in self.peft_forward.items())
        return text + "".join(f"\n  skipped {name}: {why}" for name, why in self.skipped.items())


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, as PEFT's ``get_nb_trainable_parameters`` counts them: a
    bitsandbytes 4-bit parameter holds two values per storage byte."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":
            count *= 2 * param.element_size()
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")

"""fastpeft inside other models: PEFT models accelerated in place, and fastpeft's own adapters added to any model.

- :mod:`~fastpeft.integration.accelerate`: ``accelerate`` / ``restore``, the class swap of a PEFT model's layers;
- :mod:`~fastpeft.integration.layer_classes`: the runtime subclasses of PEFT's (and bitsandbytes') layer classes
  that the swap assigns, pickled as the classes they were made from;
- :mod:`~fastpeft.integration.fused_forward`: an accelerated layer's forward, the per-call decision between a fused
  op and PEFT's forward;
- :mod:`~fastpeft.integration.peft_paths`: the fused paths for PEFT states beyond one plain adapter (several active
  adapters, ``adapter_names=`` mixed batches, AdaLoRA);
- :mod:`~fastpeft.integration.multi_adapter_training`: ``train_adapters``, several LoRA adapters trained at once in
  mixed batches (``adapter_names=`` in training mode), and the adapted layers' training path for them;
- :mod:`~fastpeft.integration.frozen_4bit`: the bitsandbytes 4-bit layers no PEFT layer wraps, on fastpeft's NF4 op;
- :mod:`~fastpeft.integration.inject`: ``inject``, LoRA / DoRA layers added without peft;
- :mod:`~fastpeft.integration.adapter_files`: ``save_model_adapter`` / ``load_model_adapter``, such a model's
  adapter in PEFT's format;
- :mod:`~fastpeft.integration.summary`: ``PatchSummary`` and the trainable-parameter count.

Nothing is imported here: each module is imported where it is used (``fastpeft/__init__.py`` for the public API).
"""

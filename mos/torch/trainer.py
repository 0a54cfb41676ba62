"""MoSTrainer: transformers.Trainer whose checkpoints hold the MoS adapter instead of the frozen base.

Why a subclass (one line for the user: `MoSTrainer(...)` where they wrote `Trainer(...)`):
transformers.Trainer decides what a checkpoint holds by the model's type. `Trainer._save` calls
`save_pretrained` only on a `PreTrainedModel` or a `peft.PeftModel` and writes the whole
`state_dict()` for any other model; `Trainer._load_from_checkpoint` restores adapters only for a
`PeftModel`. A MoSModel is neither: becoming one would mean subclassing PEFT's model, whose methods
assume PEFT's own tuners, or patching transformers. A plain Trainer still trains a MoSModel with its
defaults and resumes from its checkpoints, but every checkpoint then carries the whole base model.

MoSTrainer writes checkpoints and `save_model()` output with `MoSModel.save_pretrained` (what
`MoSModel.from_pretrained` reads), and `resume_from_checkpoint` copies the saved pools into the
model's own parameters, bit for bit, after checking they belong to the same adapter.
"""
from __future__ import annotations

import os

import torch
import transformers

from ..pool import ShardPool
from . import files, saved_modules
from .model import MoSModel

__all__ = ["MoSTrainer"]

_TRAINING_ARGS_NAME = "training_args.bin"  # what transformers.Trainer._save writes next to the model


class MoSTrainer(transformers.Trainer):
    """transformers.Trainer for a MoSModel: checkpoints and save_model() hold the adapter only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self._mos_model()
        if model is not None and self.args.label_names is None:
            # Trainer reads label names from the model's class; the base model's class knows them.
            base_class = model.get_base_model().__class__
            self.label_names = transformers.utils.find_labels(base_class)
            self.can_return_loss = transformers.utils.can_return_loss(base_class)

    def _mos_model(self):
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, MoSModel) else None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        model = self._mos_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        mos_model = self._mos_model() if model is None or model is self.model else None
        if mos_model is None or not os.path.isfile(os.path.join(resume_from_checkpoint, files.CONFIG_NAME)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name in mos_model.peft_config:
            directory = resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            restore_pools(mos_model, directory, name)

    def _load_best_model(self) -> None:
        mos_model = self._mos_model()
        best = self.state.best_model_checkpoint
        if mos_model is None or best is None or not os.path.isfile(os.path.join(best, files.CONFIG_NAME)):
            return super()._load_best_model()
        self._load_from_checkpoint(best)


def restore_pools(model: MoSModel, directory: str, adapter_name: str) -> None:
    """Copies the pools saved in `directory` into `adapter_name`'s parameters, in place (optimizer
    state keeps pointing at them). Raises ValueError, changing nothing, unless the saved adapter
    is this one: same config, same modules, same index tables."""
    state = files.read_adapter(directory)
    current = model.peft_config[adapter_name]
    if _settings(state.config) != _settings(current):
        raise ValueError(f"{os.path.join(directory, files.CONFIG_NAME)}: the saved config differs from "
                         f"adapter {adapter_name!r}'s; it is another adapter")
    pools = model.mos_pools[adapter_name]
    layouts = {t: _Layout(t, p.d_in, p.d_out, [path for path, _ in entries])
               for t, entries in model.adapter_paths(adapter_name).items() for p in [pools[t]]}
    fresh = {t: ShardPool(t, p.d_in, p.d_out, p.n_layers, current) for t, p in pools.items()}
    saved = files.validate_adapter(state, fresh, layouts)  # shapes, dtypes, finiteness, tables
    for module_type, (values, tables) in saved.items():
        shared = pools[module_type]
        for name, table in zip(("index_a", "index_b"), tables):
            if not torch.equal(torch.tensor(table, dtype=torch.int32), getattr(shared, name).cpu()):
                raise ValueError(f"{os.path.join(directory, files.WEIGHTS_NAME)}: {module_type}.{name} differs "
                                 f"from adapter {adapter_name!r}'s; it is another adapter")
    plan = model.saved_plan(adapter_name)
    saved_values = saved_modules.load_saved(os.path.join(directory, files.WEIGHTS_NAME), state.tensors,
                                            model.get_base_model(), plan)
    with torch.no_grad():
        for module_type, (values, _) in saved.items():
            shared = pools[module_type]
            shared.pool_a.copy_(values[0])
            shared.pool_b.copy_(values[1])
    saved_modules.copy_saved(model.get_base_model(), adapter_name, plan, saved_values)  # heads, biases


def _settings(config):
    """The config without pool_dtype, which records what the pools hold when saved (a cast model)."""
    return {k: v for k, v in config.to_dict().items() if k != "pool_dtype"}


class _Layout:
    """The parts of targets.TypeLayout that files.validate_adapter reads."""

    def __init__(self, module_type, d_in, d_out, paths):
        self.module_type, self.d_in, self.d_out, self.paths = module_type, d_in, d_out, paths

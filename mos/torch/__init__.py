"""PyTorch integration of MoS: differentiable ops, the MoSLinear layer and PEFT-style model wrapping.

    import mos
    model = mos.get_mos_model(base_model, mos.MoSConfig(r=8, equivalent_rank=2, target_modules="all-linear"))
    model.print_trainable_parameters()
    ...train...
    model.save_pretrained("out")                      # pools + index tables
    model.export_lora("out-lora")                      # plain PEFT LoRA, loads with peft
    model = mos.MoSModel.from_pretrained(base_model, "out")
"""
from .export import export_lora
from .layer import MoSLinear
from .model import MoSModel, get_mos_model
from .ops import adapter_linear
from .pools import SharedPools
from .store import AdapterStore
from .state import get_peft_model_state_dict

__all__ = ["AdapterStore", "MoSLinear", "MoSModel", "SharedPools", "adapter_linear", "export_lora",
           "get_mos_model", "get_peft_model_state_dict"]

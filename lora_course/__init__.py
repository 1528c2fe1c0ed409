"""lora_course: the reference code of the LoRA course (see README.md for the map to notebooks)."""
from .accounting import (expected_lora_parameters, lora_parameter_count, print_trainable_parameters,
                         total_parameters, trainable_parameters, trainable_parameters_summary,
                         training_memory_bytes)
from .errors import (ArgumentTypeError, CheckpointError, LoRAStateError, NonFiniteError, RankAboveMatrixRankWarning,
                     UnsupportedLayerError)
from .adapters import AdapterError, inspect_adapter, load_adapter, lora_state_dict, read_adapter, save_adapter
from .lora import (SCALINGS, LinearWithLoRA, LoRALayer, LoRAReport, lora_disabled, lora_layers, lora_scaling,
                   mark_only_lora_as_trainable, merge_and_unload, merge_lora_, remove_lora,
                   replace_linear_with_lora, set_lora_enabled, unmerge_lora_)

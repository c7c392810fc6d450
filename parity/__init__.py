"""torch_ref <-> jaxcell: weight conversion by one mechanical key map, and layer-by-layer comparison.

    variables = parity.torch_to_flax("lightnetcell", state_dict, image_size=224)
    state_dict = parity.flax_to_torch("lightnetcell", variables, image_size=224)
    rows = parity.compare.compare("lightnetcell", image_size=64)   # list of LayerDiff
    exit_code = parity.main(["--model", "lightnetcell", "--image-size", "64"])

Importing sets no global configuration (precision settings are scoped to `compare`).
"""

from parity.compare import LayerDiff, format_table, main
from parity.convert import ConversionError, Entry, flax_module_path, flax_to_torch, key_map, torch_to_flax

__all__ = ["ConversionError", "Entry", "LayerDiff", "flax_module_path", "flax_to_torch", "format_table", "key_map",
           "main", "torch_to_flax"]

"""torch_ref <-> jaxcell: weight conversion by one mechanical key map, and layer-by-layer comparison.

    variables = parity.torch_to_flax("lightnetcell", state_dict, image_size=224)
    state_dict = parity.flax_to_torch("lightnetcell", variables, image_size=224)
    rows = parity.compare.compare("lightnetcell", image_size=64)   # list of LayerDiff
    exit_code = parity.compare.run("lightnetcell", image_size=64, batch=2, seed=0, tolerance=1e-5)  # jaxcell parity

Importing sets no global configuration (precision settings are scoped to `compare`).
"""

from parity import compare
from parity.compare import LayerDiff, format_table
from parity.convert import ConversionError, Entry, flax_module_path, flax_to_torch, key_map, torch_to_flax

__all__ = ["ConversionError", "Entry", "LayerDiff", "flax_module_path", "flax_to_torch", "format_table", "key_map",
           "compare", "torch_to_flax"]

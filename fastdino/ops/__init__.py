"""Public functionals: each dispatches to the fastest backend that applies, else the reference."""

from .add_layer_norm import add_layer_norm, add_layer_norm_ref

OPS = {"add_layer_norm": add_layer_norm}

__all__ = ["add_layer_norm", "add_layer_norm_ref", "OPS"]

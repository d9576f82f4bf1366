"""Shared start-up for the absl entry points."""
import sys


def load_model(checkpoint: str, dtype=None, mesh=None, numerics: str = "dequantized"):
    """`jax_introspect.load`, with a one-line error (naming the fix) instead of a traceback."""
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    import jax_introspect
    try:
        return jax_introspect.load(checkpoint, dtype=dtype, mesh=mesh, numerics=numerics)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

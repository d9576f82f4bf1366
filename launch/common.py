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


def split_config_args(argv: list, fields, error) -> tuple[list, list]:
    """(argv without the `--config.FIELD` flags, [(field, value), ...] in order). Both
    `--config.FIELD=VALUE` and `--config.FIELD VALUE` are understood; a field not in `fields` is
    refused with `error`."""
    kept, overrides, i = [argv[0]], [], 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            kept += argv[i:]
            break
        if not arg.startswith("--config."):
            kept.append(arg)
            i += 1
            continue
        field, has_value, value = arg[len("--config."):].partition("=")
        if field not in fields:
            raise error(f"unknown config field {field!r} in {arg!r}; fields: {', '.join(fields)}")
        if not has_value:
            if i + 1 >= len(argv):
                raise error(f"{arg} needs a value, e.g. {arg}=VALUE")
            i, value = i + 1, argv[i + 1]
        overrides.append((field, value))
        i += 1
    return kept, overrides


def parse_config_flags(argv, fields, error, parse_field, overrides_out: list):
    """absl's parser for the other flags, the `--config.FIELD` overrides read here (each value
    parsed by `parse_field`, so a malformed one is refused before absl parses anything) and stored
    in `overrides_out`; one-line errors, no tracebacks."""
    from absl import flags
    try:
        argv, overrides = split_config_args(list(argv), fields, error)
        for field, value in overrides:
            parse_field(field, value)
    except error as e:
        sys.exit(f"error: {e}")
    overrides_out[:] = overrides
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {str(e).strip().splitlines()[-1] if str(e).strip() else e}")

"""Error types every layer raises, defined below all of them (parallel/ and model/ both validate configs)."""


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model or run."""

"""Errors vtprune raises for input it cannot handle. Each message names the problem and what would work."""


class VTPruneError(ValueError):
    """Bad or unsupported input to vtprune."""


class UnsupportedModelError(VTPruneError):
    """No adapter handles this model class."""


class UnsupportedSignalError(VTPruneError):
    """A method asks for a site or signal the model's adapter cannot provide."""

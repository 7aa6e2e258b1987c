"""``sdmprune.activation_offload`` is ``sdmprune.scale.activation_offload`` (the import path the README
showed first): the same module object, so setting an attribute here sets it there."""
import sys

from .scale import activation_offload as _module

sys.modules[__name__] = _module

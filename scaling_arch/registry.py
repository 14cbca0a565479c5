"""Imports every module that registers gin configurables, so gin files can name them.

Architectures are discovered: every module in `scaling_arch/architectures/` is imported, so adding an
architecture means adding its module and its gin file, nothing here.
"""

import importlib
import pkgutil

from scaling_arch import architectures
from scaling_arch import models  # noqa: F401
from scaling_arch.layers import attention, dense, embedding, mlp, norms, relative_position, transformer  # noqa: F401

for _info in pkgutil.iter_modules(architectures.__path__):
  importlib.import_module(f"{architectures.__name__}.{_info.name}")

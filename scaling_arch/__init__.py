"""scaling-arch: do different model architectures scale differently?

A T5X-style JAX/Flax codebase that pretrains, fine-tunes and measures T5-style encoder-decoder models of
several architectures over a ladder of sizes, and fits a scaling law per architecture.
"""

__version__ = "0.1.0"

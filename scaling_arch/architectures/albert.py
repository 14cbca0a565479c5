"""ALBERT-style cross-layer parameter sharing and factorized embeddings (Lan et al. 2019; architectures
spec section 8, decision 7).

Each stack owns ONE set of layer weights (encoder and decoder separately) and applies it `num_layers`
times: an `nn.scan` with `variable_broadcast='params'`, so the parameters carry no `layers` axis and do
not grow with depth, while the `cache` collection (decoder key/value caches), dropout RNGs and sown
aux-losses/metrics get one slice per application. FLOPs equal the vanilla model's.

The token embedding is factorized, x0 = F1[ids] F2 with F1 [vocab, 128] and F2 [128, d_model], both
N(0, 128^-1/4) so that F1 F2 has unit variance like T5's N(0, 1) table. The output layer is the untied
d_model -> vocab dense (`layers.UntiedHead`, as in the reference configuration that gives about 45M
parameters at base); `layers.TiedHead` ties it through the factorization, logits = ((x d^-1/2) F2^T) F1^T.

`SharedEncoder` / `SharedDecoder` are the skeleton's stacks (relative position bias per stack, final
norm, incremental decoding) with `apply_layers` overridden; the Universal Transformer subclasses them
and overrides it again.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from scaling_arch.layers import initializers
from scaling_arch.layers import transformer
from scaling_arch.layers.transformer import LayerInputs

Factory = Callable[..., nn.Module]

# Collections with one slice per application of a shared layer (params are broadcast instead).
PER_APPLICATION_COLLECTIONS = {"cache": 0, "aux_loss": 0, "metrics": 0}


def scan_shared(module_cls, module_kwargs: dict, carry, *args, num_applications: int, scan: bool,
                remat_policy: str, in_axes: Sequence[Any], static_argnums: Sequence[int] = (),
                name: str = "shared_layer"):
  """Applies one module (one set of parameters) `num_applications` times in sequence.

  `module_cls(**module_kwargs)` is called as `module(carry, *args) -> (carry, out)`; `in_axes` says for
  each of `args` whether it is scanned over (0) or broadcast (`nn.broadcast`). Parameters are broadcast
  (shared), the cache / aux_loss / metrics collections are stacked per application, dropout draws a new
  mask per application. With scan=False the loop is fully unrolled (same parameter tree either way).
  Must be called from inside a compact method.
  """
  if remat_policy not in transformer.REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {remat_policy!r}; choose one of "
                     f"{sorted(transformer.REMAT_POLICIES)}")
  cls = module_cls
  if remat_policy != "none":
    cls = nn.remat(cls, policy=transformer.REMAT_POLICIES[remat_policy], prevent_cse=False,
                   static_argnums=tuple(static_argnums))
  scanned = nn.scan(cls, variable_broadcast="params", variable_axes=PER_APPLICATION_COLLECTIONS,
                    split_rngs={"params": False, "dropout": True}, in_axes=tuple(in_axes),
                    length=num_applications,
                    unroll=transformer.scan_unroll() if scan else max(num_applications, 1))
  return scanned(name=name, **module_kwargs)(carry, *args)


@gin.configurable(module="architectures")
class FactorizedEmbed(nn.Module):
  """ALBERT's factorized token embedding: E = F1 F2, F1 [vocab, inner], F2 [inner, d_model].

  `attend` gives x F2^T F1^T, the output layer tied through the factorization (MTF's
  FactorizedVocabEmbedding.hidden_to_logits; `layers.TiedHead` applies the d^-1/2 scale first).
  """
  num_embeddings: int
  features: int
  inner_dim: int = 128
  dtype: Any = jnp.float32

  def setup(self):
    init = initializers.normal_std(self.inner_dim ** -0.25)
    self.embedding1 = self.param("embedding1", nn.with_logical_partitioning(init, ("vocab", "unmodeled")),
                                 (self.num_embeddings, self.inner_dim), jnp.float32)
    self.embedding2 = self.param("embedding2", nn.with_logical_partitioning(init, ("unmodeled", "embed")),
                                 (self.inner_dim, self.features), jnp.float32)

  def __call__(self, ids):
    e = jnp.take(self.embedding1, ids, axis=0).astype(self.dtype)
    x = jnp.einsum("...e,ed->...d", e, self.embedding2.astype(self.dtype))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def attend(self, x):
    h = jnp.einsum("...d,ed->...e", x.astype(self.dtype), self.embedding2.astype(self.dtype))
    return jnp.einsum("...e,ve->...v", h, self.embedding1.astype(self.dtype))


def _apply_shared_layers(stack: nn.Module, x, inputs: LayerInputs, *, deterministic: bool, decode: bool):
  """The shared stacks' `apply_layers`: one layer's weights applied `stack.num_layers` times."""
  layer = stack.layer_factory(dtype=stack.dtype, parent=None)
  x, _ = scan_shared(type(layer), transformer.module_fields(layer), x, inputs, deterministic, decode,
                     num_applications=stack.num_layers, scan=stack.scan_layers, remat_policy=stack.remat_policy,
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), static_argnums=(3, 4))
  return nn.with_logical_constraint(x, ("batch", "length", "embed"))


@gin.configurable(module="architectures")
class SharedEncoder(transformer.Encoder):
  """An encoder stack whose `num_layers` layers are one shared layer applied `num_layers` times.

  Everything else (relative position bias computed once per stack, final norm, dropout) is the
  skeleton's `layers.Encoder`.
  """

  def apply_layers(self, x, inputs: LayerInputs, *, deterministic: bool, decode: bool):
    return _apply_shared_layers(self, x, inputs, deterministic=deterministic, decode=decode)


@gin.configurable(module="architectures")
class SharedDecoder(transformer.Decoder):
  """A decoder stack whose `num_layers` layers are one shared layer applied `num_layers` times.

  Everything else is the skeleton's `layers.Decoder`, including incremental decoding: each application
  has its own key/value cache (the cache collection is stacked over applications), the weights are shared.
  """

  def apply_layers(self, x, inputs: LayerInputs, *, deterministic: bool, decode: bool):
    return _apply_shared_layers(self, x, inputs, deterministic=deterministic, decode=decode)

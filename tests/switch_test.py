"""Switch Transformer: routing, capacity and the load-balancing loss; MoE-layer placement; the model
contract with MoE layers present; expert-parallel training on the cpu_expert mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import architectures_test as harness
from scaling_arch import gin_utils, models, optimizers, partitioning, trainer
from scaling_arch.architectures import switch
from scaling_arch.layers import attention as attention_lib
from scaling_arch.layers.attention import MultiHeadAttention
from scaling_arch.layers.transformer import EncoderLayer, LayerInputs

# A tiny geometry with MoE layers in both stacks: 4 layers, an MoE layer every 2nd (a scan over 2 blocks).
MOE_TINY = harness.TINY[:] + ["NUM_ENCODER_LAYERS = 4", "NUM_DECODER_LAYERS = 4", "EXPERT_EVERY = 2",
                              "NUM_EXPERTS = 8"]


def moe_apply(ff, x, segment_ids, *, deterministic, rng=0, params=None):
  """Applies a SwitchFeedForward; returns (y, params, aux_loss, metrics)."""
  if params is None:
    params = nn.unbox(ff.init({"params": jax.random.key(rng)}, x, segment_ids, deterministic=True)["params"])
  y, state = ff.apply({"params": params}, x, segment_ids, deterministic=deterministic,
                      rngs={"dropout": jax.random.key(rng + 1)}, mutable=["aux_loss", "metrics"])
  return y, params, float(state["aux_loss"]["moe_loss"]), {k: float(v) for k, v in state["metrics"].items()}


# -- routing and the load-balancing loss ------------------------------------------------------------------
def test_load_balance_loss_is_one_times_the_coefficient_for_a_uniform_router():
  num_experts = 8
  ff = switch.SwitchFeedForward(intermediate_dim=16, num_experts=num_experts, jitter=0.0)
  x = jax.random.normal(jax.random.key(0), (2, 16, 32))
  seg = jnp.ones((2, 16), jnp.int32)
  params = nn.unbox(ff.init({"params": jax.random.key(1)}, x, seg, deterministic=True)["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.zeros_like(v) if "router" in jax.tree_util.keystr(p) else v, params)
  _, _, aux, metrics = moe_apply(ff, x, seg, deterministic=False, params=params)
  assert abs(metrics["load_balance_loss"] - 1.0) < 1e-6
  assert abs(aux - 0.01 * 1.0) < 1e-8  # coefficient 0.01, router z-loss off

  # Directly: uniform probabilities give exactly 1, a collapsed router (all tokens, probability ~1, to
  # one expert) gives ~E, and a balanced confident router gives ~1.
  nonpad = jnp.ones((1, 64))
  _, _, uniform = switch.top1_routing(jnp.zeros((1, 64, num_experts)), nonpad, capacity=64)
  collapsed_logits = jnp.zeros((1, 64, num_experts)).at[..., 3].set(20.0)
  _, _, collapsed = switch.top1_routing(collapsed_logits, nonpad, capacity=64)
  balanced_logits = 20.0 * jax.nn.one_hot(jnp.arange(64) % num_experts, num_experts)[None]
  _, _, balanced = switch.top1_routing(balanced_logits, nonpad, capacity=64)
  assert abs(float(uniform["load_balance_loss"]) - 1.0) < 1e-6
  assert abs(float(collapsed["load_balance_loss"]) - num_experts) < 1e-3
  assert abs(float(balanced["load_balance_loss"]) - 1.0) < 1e-3
  assert float(collapsed["expert_imbalance"]) == num_experts and float(balanced["expert_imbalance"]) == 1.0


def test_padding_is_not_routed_and_not_counted():
  logits = jax.random.normal(jax.random.key(0), (2, 8, 4))
  nonpad = jnp.ones((2, 8)).at[:, 5:].set(0.0)
  dispatch, combine, stats = switch.top1_routing(logits, nonpad, capacity=8)
  assert float(jnp.abs(dispatch[:, 5:]).sum()) == 0.0 and float(jnp.abs(combine[:, 5:]).sum()) == 0.0
  # Statistics equal those of the real tokens alone.
  _, _, alone = switch.top1_routing(logits[:, :5], jnp.ones((2, 5)), capacity=8)
  for name in ("load_balance_loss", "router_z_loss", "fraction_dropped", "expert_imbalance"):
    np.testing.assert_allclose(float(stats[name]), float(alone[name]), rtol=1e-6)


def test_earlier_tokens_of_a_group_win_the_capacity():
  logits = jnp.zeros((1, 6, 2)).at[..., 0].set(5.0)  # every token prefers expert 0
  dispatch, _, stats = switch.top1_routing(logits, jnp.ones((1, 6)), capacity=2)
  kept = dispatch.sum(axis=(2, 3))[0]
  np.testing.assert_array_equal(kept, [1, 1, 0, 0, 0, 0])
  assert abs(float(stats["fraction_dropped"]) - 4 / 6) < 1e-6


def test_small_capacity_drops_tokens_and_dropped_tokens_pass_the_residual_unchanged():
  ff = switch.SwitchFeedForward(intermediate_dim=16, num_experts=4, capacity_factor_train=0.25,
                                min_expert_capacity=1, jitter=0.0, group_size=32)
  x = jax.random.normal(jax.random.key(0), (2, 16, 8))
  seg = jnp.ones((2, 16), jnp.int32)
  y, params, _, metrics = moe_apply(ff, x, seg, deterministic=False)
  assert metrics["fraction_dropped"] > 0.0
  # Recompute the routing: a dropped token has no slot, and its feed-forward output is exactly zero.
  logits = jnp.einsum("gsd,de->gse", x.reshape(1, 32, 8), params["router"]["kernel"])
  capacity = switch.expert_capacity(32, 4, 0.25, 1)
  dispatch, _, _ = switch.top1_routing(logits, jnp.ones((1, 32)), capacity)
  dropped = np.asarray(dispatch.sum(axis=(2, 3))[0] == 0).reshape(2, 16)
  assert dropped.mean() == pytest.approx(metrics["fraction_dropped"])
  y = np.asarray(y)
  assert np.all(y[dropped] == 0.0)
  assert np.all(np.abs(y[~dropped]).sum(-1) > 0.0)

  # In a whole MoE layer, the feed-forward sublayer then leaves a dropped token's residual stream as it was.
  layer = EncoderLayer(
      feed_forward_factory=lambda **kw: switch.SwitchFeedForward(
          intermediate_dim=16, num_experts=4, capacity_factor_train=0.25, min_expert_capacity=1,
          jitter=0.0, group_size=32, **kw),
      self_attention_factory=lambda **kw: MultiHeadAttention(num_heads=2, head_dim=4, **kw))
  inputs = LayerInputs(attention_lib.self_attention_inputs(seg, causal=False))
  variables = layer.init({"params": jax.random.key(2)}, x, inputs, True)
  (out, _), state = layer.apply(variables, x, inputs, False, rngs={"dropout": jax.random.key(3)},
                                capture_intermediates=True, mutable=["intermediates", "metrics"])
  mid = x + state["intermediates"]["attention"]["__call__"][0]  # residual stream before the MoE sublayer
  layer_dropped = np.asarray(state["metrics"]["mlp"]["fraction_dropped"])
  assert layer_dropped > 0.0
  unchanged = np.all(np.asarray(out) == np.asarray(mid), axis=-1)
  assert unchanged.mean() == pytest.approx(float(layer_dropped))


def test_evaluation_drops_no_token():
  ff = switch.SwitchFeedForward(intermediate_dim=16, num_experts=4, capacity_factor_train=0.25,
                                capacity_factor_eval=0.25, min_expert_capacity=1)
  x = jax.random.normal(jax.random.key(0), (2, 16, 8))
  seg = jnp.ones((2, 16), jnp.int32)
  _, params, _, train = moe_apply(ff, x, seg, deterministic=False)
  _, _, _, evaluation = moe_apply(ff, x, seg, deterministic=True, params=params)
  assert train["fraction_dropped"] > 0.0 and evaluation["fraction_dropped"] == 0.0
  # The reference code's behaviour, on request: the evaluation capacity factor applies.
  ff_drop = ff.clone(drop_tokens_at_eval=True)
  _, _, _, dropping = moe_apply(ff_drop, x, seg, deterministic=True, params=params)
  assert dropping["fraction_dropped"] > 0.0


def test_group_shape_keeps_groups_within_a_batch_shard():
  assert switch.group_shape(16, 32, 1024, shards=8) == (8, 64)    # a group = one shard's 2 rows
  assert switch.group_shape(16, 32, 1024, shards=1) == (1, 512)
  assert switch.group_shape(16, 32, 16, shards=8) == (32, 16)     # rows longer than a group are split
  assert switch.group_shape(2, 1, 256, shards=16) == (1, 2)       # batch smaller than the shards
  assert switch.expert_capacity(1024, 32, 1.25, 4) == 40
  assert switch.expert_capacity(8, 32, 1.25, 4) == 4


# -- placement and parameter counts ---------------------------------------------------------------------
def param_shapes(bindings, size="tiny", vocab=harness.VOCAB):
  module = harness.build("switch", size=size, bindings=bindings, vocab=vocab)
  x = jnp.ones((1, harness.INPUT_LENGTH), jnp.int32)
  y = jnp.ones((1, harness.TARGET_LENGTH), jnp.int32)
  return jax.eval_shape(module.init, jax.random.key(0), x, y, y)["params"]


@pytest.mark.parametrize("layers,every,blocks,rest", [(12, 4, 3, 0), (6, 4, 1, 2), (2, 4, 0, 2), (4, 1, 4, 0)])
def test_an_moe_layer_at_every_expert_every_th_layer(layers, every, blocks, rest):
  p = nn.unbox(param_shapes(harness.TINY + [f"NUM_ENCODER_LAYERS = {layers}",
                                            f"NUM_DECODER_LAYERS = {layers}", f"EXPERT_EVERY = {every}"]))
  for stack in ("encoder", "decoder"):
    if blocks:
      assert p[stack]["blocks"]["moe"]["mlp"]["wi"].shape[0] == blocks
      assert len([k for k in p[stack]["blocks"] if k.startswith("dense_")]) == every - 1
    else:
      assert "blocks" not in p[stack]
    if rest:
      assert p[stack]["layers"]["mlp"]["wi"]["kernel"].shape[0] == rest
    else:
      assert "layers" not in p[stack]


def test_base_parameter_count_is_vanilla_plus_31_expert_copies_in_6_layers():
  count = models.count_params(param_shapes([], size="base", vocab=32128))
  d, dff, experts = 768, 3072, 32
  assert count == 222_903_552 + 6 * ((experts - 1) * 2 * d * dff + d * experts) == 1_100_709_120


# -- the model contract with MoE layers present (the harness's tiny geometry has none) ---------------
def test_model_contract_with_moe_layers():
  """The harness's causality, packing, padding and incremental-decoding checks, with 2 MoE layers in
  each stack (one build: the gin configuration only lives for one test)."""
  module = harness.build("switch", bindings=MOE_TINY)
  rng = np.random.RandomState(0)
  enc = jnp.asarray(rng.randint(1, harness.VOCAB, (2, harness.INPUT_LENGTH)), jnp.int32)
  tgt = jnp.asarray(rng.randint(1, harness.VOCAB, (2, harness.TARGET_LENGTH)), jnp.int32)
  variables = jax.jit(module.init)(jax.random.key(0), enc, harness.shift(tgt), tgt)
  assert "blocks" in variables["params"]["encoder"] and "blocks" in variables["params"]["decoder"]
  tiny = ("switch", harness.jitted(module), {"params": variables["params"]}, enc, tgt)
  harness.test_decoder_is_causal(tiny)
  harness.test_packed_examples_do_not_see_each_other(tiny)
  harness.test_encoder_padding_content_is_ignored(tiny)
  harness.test_incremental_decoding_equals_teacher_forcing(tiny)


# -- expert parallelism -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh", ["cpu_expert", "cpu_4x4"])
def test_train_step_on_a_mesh_equals_the_unsharded_loss(mesh):
  """cpu_expert: ('data', 'model', 'expert') = (2, 2, 4), experts split over `expert`; cpu_4x4: a mesh
  without an `expert` axis, where experts are replicated over data and split over model along their
  hidden dimension."""
  # GROUP_SIZE 16: the same groups with and without the mesh (a shard holds 2 or 4 rows of 8 target
  # tokens, grouped in pairs, and each 32-token input row is split in two), so the same tokens are
  # dropped in both.
  files = ["gin/models/switch.gin", "gin/sizes/tiny.gin", "gin/runs/pretrain_local.gin"]
  bindings = ["MODEL_DIR = '/tmp/unused'", "BATCH_SIZE = 16", *MOE_TINY, "GROUP_SIZE = 16"]
  if mesh == "cpu_expert":
    files.append("gin/meshes/cpu_expert.gin")
  else:
    bindings.append("MESH_SHAPE = (4, 4)")
  gin_utils.parse(files, bindings)
  module = gin_utils.configured_module(vocab_size=512)
  part = partitioning.Partitioner()
  expected_mesh = {"data": 2, "model": 2, "expert": 4} if mesh == "cpu_expert" else {"data": 4, "model": 4}
  assert part.mesh.shape == expected_mesh
  lr = optimizers.rsqrt_schedule()
  shapes = {"encoder_input_tokens": (16, 32), "decoder_input_tokens": (16, 8),
            "decoder_target_tokens": (16, 8)}
  tr = trainer.Trainer(models.EncoderDecoderModel(module), part, optimizer=optimizers.adafactor(lr),
                       learning_rate_fn=lr, batch_shapes=shapes)
  state = tr.init_state()

  for stack in ("encoder", "decoder"):
    for name in ("wi", "wo"):
      kernel = state.params[stack]["blocks"]["moe"]["mlp"][name]
      hidden = 2 if name == "wi" else 1
      if mesh == "cpu_expert":
        # Experts' kernels are split over the `expert` mesh axis: each device holds 8 / 4 = 2 experts.
        assert kernel.sharding.spec[1] == "expert", (stack, name, kernel.sharding.spec)
        assert kernel.addressable_shards[0].data.shape[1] == 2
      else:
        assert kernel.addressable_shards[0].data.shape[1] == 8
      assert kernel.sharding.spec[1 + hidden] == "model"
  if mesh == "cpu_expert":
    assert "all-to-all" in tr.compiled_train_step().as_text()

  rng = np.random.RandomState(0)
  batch = {k: rng.randint(1, 512, shapes[k]).astype(np.int32)
           for k in ("encoder_input_tokens", "decoder_target_tokens")}
  batch["decoder_input_tokens"] = np.concatenate(
      [np.zeros((16, 1), np.int32), batch["decoder_target_tokens"][:, :-1]], axis=1)
  params = jax.device_get(state.params)
  state, metrics = tr.train_step(state, part.put_batch(batch))
  loss = float(metrics["loss"])
  assert np.isfinite(loss)
  # Routing statistics are logged per MoE stack; tokens were dropped in training (capacity 4 of 16).
  for stack in ("encoder", "decoder"):
    prefix = f"metrics/{stack}/blocks/moe/mlp/"
    for name in ("load_balance_loss", "router_z_loss", "fraction_dropped", "expert_imbalance"):
      assert prefix + name in metrics, sorted(metrics)
    assert 0.9 < float(metrics[prefix + "load_balance_loss"]) < 8.0
  assert float(metrics["aux_loss"]) > 0.0
  # The same training loss (same jitter and dropout key) on one device, unsharded.
  one_device = jax.device_put(params, jax.devices()[0])
  step_rng = jax.random.fold_in(tr.rng, 0)
  single, _ = jax.jit(lambda p, b, r: tr.model.loss_fn(p, b, r, enable_dropout=True))(one_device, batch,
                                                                                     step_rng)
  assert abs(float(single) - loss) < 1e-4, (float(single), loss)

"""Test setup: 16 CPU devices, forced before JAX is imported, so meshes such as 4x4 work on any host."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f] +
    ["--xla_force_host_platform_device_count=16"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_gin():
  """Gin's configuration is global: every test starts and ends with none."""
  import gin
  gin.clear_config()
  yield
  gin.clear_config()

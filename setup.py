"""scaling-arch: do different model architectures scale differently? (Tay et al. 2022, in JAX/Flax)

Dependency note (deliberate): `t5` 0.9.4 asks for `seqio-nightly` and `tfds-nightly`, and through
`mesh-tensorflow[transformer]` also for `tensorflow-datasets`; the nightly and the stable distributions
install into the same import directories (`seqio/`, `tensorflow_datasets/`). We keep exactly one of each:
the nightly ones t5 names, at the versions seqio-nightly pins (tfds-nightly 4.9.2.dev202308090034), and
install t5 itself with `--no-deps` (see the README's install command), listing its real requirements here
(mesh-tensorflow without the [transformer] extra). `pip check` is then clean.
"""

import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def gin_package_data():
  files = []
  for root, _, names in os.walk(os.path.join(HERE, "gin")):
    for name in names:
      if name.endswith(".gin"):
        files.append(os.path.relpath(os.path.join(root, name), os.path.join(HERE, "gin")))
  return sorted(files)


setup(
    name="scaling-arch",
    version="0.1.0",
    description="Pretrain, fine-tune and measure T5-style encoder-decoders of twelve architectures over "
                "a ladder of sizes, and fit a scaling law per architecture.",
    python_requires=">=3.10,<3.13",
    packages=["scaling_arch", "scaling_arch.layers", "scaling_arch.architectures", "scaling_arch.analysis",
              "scaling_arch.gin", "tasks", "launch"],
    package_dir={"scaling_arch.gin": "gin"},
    package_data={"scaling_arch.gin": gin_package_data()},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "clu>=0.0.12,<0.1",
        "gin-config>=0.5.0,<0.6",
        "sentencepiece>=0.2.0,<0.3",
        "tensorflow>=2.21,<2.22",
        "tensorflow-text>=2.21,<2.22",
        "tensorboard>=2.21,<2.22",
        # seqio and tensorflow-datasets, as the distributions t5 0.9.4 names (see the note above).
        "seqio-nightly>=0.0.18.dev20250227,<0.0.19",
        "tfds-nightly>=4.9.2.dev202308090034,<4.9.3",
        # t5 0.9.4's own requirements (t5 itself is installed with --no-deps).
        "mesh-tensorflow>=0.1.21,<0.2",
        "babel>=2.9,<3",
        "editdistance>=0.6,<1",
        "immutabledict>=2.0,<5",
        "nltk>=3.8,<4",
        "pandas>=2.0,<4",
        "rouge-score>=0.1.2,<0.2",
        "sacrebleu>=2.0,<3",
        "scikit-learn>=1.3,<2",
        "scipy>=1.11,<2",
        "six>=1.14,<2",
        "transformers>=4.30,<6",
        "numpy>=1.26,<3",
        "absl-py>=2.0,<3",
        # the analysis (scaling_arch/analysis): figures and the Parquet table.
        "matplotlib>=3.8,<4",
        "pyarrow>=14,<27",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-timeout>=2.2,<3", "pytest-xdist>=3.5,<4"],
        # The TPU compiler and runtime (libtpu), at the version the installed jax names in its own `tpu`
        # extra: `python -m launch plan` compiles for TPU slices on a CPU with it; TPU VMs run with it.
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    },
)

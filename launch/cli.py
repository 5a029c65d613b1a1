"""What the run launchers (tpu_pod, evaluate, ask) share: the --config flag and its default.

The config files import `configs.base`, so the repository root goes on sys.path. With no
--config the embedded demo (configs/demo.py) runs, on the host CPU.
"""
import os
import pathlib
import sys

from absl import app
from ml_collections import config_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

config_flags.DEFINE_config_file("config", str(REPO_ROOT / "configs" / "demo.py"),
                                "a configs/*.py file (optionally file.py:recipe)",
                                lock_config=True)


def run(main) -> None:
    """app.run(main), on the host when the embedded demo is the config."""
    if not any(arg.startswith("--config=") or arg == "--config" for arg in sys.argv[1:]):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)

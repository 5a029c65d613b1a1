"""What the run launchers (tpu_pod, evaluate, ask) share: the --config flag and its default,
and how much they log.

The config files import `configs.base`, so the repository root goes on sys.path. With no
--config the embedded demo (configs/demo.py) runs, on the host CPU.
"""
import logging
import os
import pathlib
import sys

from absl import app, flags
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


# Loggers that speak at INFO on every step or checkpoint (absl's carries Orbax's messages too).
CHATTY_LOGGERS = ("absl", "orbax", "jax._src")


def quiet_logging() -> None:
    """Warnings and errors only, unless the user gave absl's --verbosity (0: INFO, 1: DEBUG).

    A run shows its progress bar and evaluation lines on stdout; pages of INFO (every
    checkpoint, every compile) would bury them. Call it in main (flags are parsed by then).
    """
    if flags.FLAGS["verbosity"].present:
        return  # absl has already set the root logger's level from the flag
    logging.getLogger().setLevel(logging.WARNING)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)

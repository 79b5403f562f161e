"""The Hydra config tree of lightning_attr (shipped in the wheel; ``pkg://lightning_attr.conf``).

The top-level ``conf/`` of the repository is a symlink to this folder, so there is one tree.
"""

from omegaconf import ListConfig, OmegaConf

# `attribute.yaml` logs under its (first) run directory; run_dir may be a list of runs
OmegaConf.register_new_resolver(
    "first_run", lambda run_dir: run_dir[0] if isinstance(run_dir, (list, ListConfig)) else run_dir, replace=True
)

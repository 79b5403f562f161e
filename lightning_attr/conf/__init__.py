"""The Hydra config tree of lightning_attr (shipped in the wheel; ``pkg://lightning_attr.conf``).

The top-level ``conf/`` of the repository is a symlink to this folder, so there is one tree.
"""

"""Puts lightning_attr's config tree on every Hydra app's search path (after the app's own tree).

With lightning_attr installed, a Hydra + Lightning project can compose the callback from its own
config without copying any file::

    # configs/train.yaml of your project
    defaults:
      - callbacks: [attribution, model_checkpoint]

Your own files win over ours (they come first in the search path), so a ``callbacks/attribution.yaml``
in your tree overrides the packaged one. Hydra discovers this class because it lives in the
``hydra_plugins`` namespace package.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LightningAttrSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="lightning_attr", path="pkg://lightning_attr.conf")

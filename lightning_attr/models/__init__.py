"""Ready-made LightningModules that implement the attribution contract, and networks for them."""

from lightning_attr.models.causal_lm import CausalLM
from lightning_attr.models.classifier import Classifier, mlp
from lightning_attr.models.nets import CNN, CNN1d, TinyTransformer, build_mlp

__all__ = ["CNN", "CNN1d", "CausalLM", "Classifier", "TinyTransformer", "build_mlp", "mlp"]

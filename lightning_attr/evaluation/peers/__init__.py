"""Peer attribution methods run through their own packages (the optional ``[bench]`` extra).

Nothing here imports dattri, traker or kronfluence until a peer is set up, so the package works
without them.
"""

from lightning_attr.evaluation.peers.base import Peer, sum_over_sources
from lightning_attr.evaluation.peers.dattri_peers import DattriIFCG, DattriIFLiSSA, DattriTracIn, DattriTRAK
from lightning_attr.evaluation.peers.kronfluence_peer import KronfluenceEKFAC
from lightning_attr.evaluation.peers.traker_peer import TraKerTRAK

__all__ = ["DattriIFCG", "DattriIFLiSSA", "DattriTRAK", "DattriTracIn", "KronfluenceEKFAC", "Peer", "TraKerTRAK", "sum_over_sources"]

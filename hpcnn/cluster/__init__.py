"""An emulated multi-node cluster on one machine (network namespaces joined
by a bridge, links shaped with tc) for tests and benchmarks: see
hpcnn/cluster/emulated.py and docs/cluster.md.  ``hpcnn cluster`` is its
command (hpcnn/cluster/command.py)."""
from hpcnn.cluster.emulated import ClusterError, EmulatedCluster, Node, list_clusters, unavailable

__all__ = ["ClusterError", "EmulatedCluster", "Node", "list_clusters", "unavailable"]

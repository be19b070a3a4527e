"""fieldkube's local Kubernetes cluster for tests, benchmarks and demos.

A real control plane (etcd, kube-apiserver, controller-manager, scheduler, the mpi-operator) on
loopback, kwok fake GPU nodes, and a real node (containerd, kubelet, kube-proxy, CoreDNS) that runs the
project's images. Built by hack/build-cluster-bins.sh; see hack/cluster/README.md.
"""

from fieldkube.localcluster.harness import (
    ClusterError,
    LocalCluster,
    Versions,
    default_cache_dir,
    default_state_dir,
)

__all__ = ["ClusterError", "LocalCluster", "Versions", "default_cache_dir", "default_state_dir"]

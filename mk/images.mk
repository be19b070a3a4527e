# Container images without a registry (hack/build-images.sh): the Debian base from mmdebstrap, the pause
# image, and images/{operator,serving,trainer}/Dockerfile built by buildah, saved as OCI archives with an
# index (~/.cache/fieldkube/images/index.json) that the local node imports. Instant when nothing changed.
# `make images IMAGES="trainer"` builds a subset; `make images-import CONTAINERD_SOCKET=/path/to.sock` imports
# them into a containerd; `make images-check` proves them in a throwaway containerd (ctr run as uid 1000).
IMAGES ?=

.PHONY: images images-import images-check

images:  ## build the container images here, without a registry (cached; rerun: seconds)
	@hack/build-images.sh build $(IMAGES)

images-import:  ## import the built images into the containerd at CONTAINERD_SOCKET (namespace k8s.io)
	@test -n "$(CONTAINERD_SOCKET)" || { echo "usage: make images-import CONTAINERD_SOCKET=/path/to/containerd.sock"; exit 2; }
	@hack/build-images.sh import "$(CONTAINERD_SOCKET)"

images-check: images  ## run the images in a throwaway containerd: entry points, torch + Horovod, non-root sshd
	@images/check-in-containerd.sh

"""A real single-node Kubernetes cluster on this machine (`watertight cluster`): the binaries built
from Debian's source package, the node started and stopped, the images, the program's objects."""

// Package container proves the container image (deploy/container) does the
// real job: it builds the image the way `make image` does, with podman and
// no base image to pull, then runs the PS, an agent and the redirector in
// containers with exactly the privileges and mounts the Kubernetes manifests
// declare, and checks that a client process in the redirector's cgroup on
// the host reaches the agent's target by its own IP.
//
// podman runs with storage, run state, temporary files and configuration of
// its own (deploy/container/containers.conf plus a private directory per
// run), so the test changes nothing global and removes everything it made.
package container

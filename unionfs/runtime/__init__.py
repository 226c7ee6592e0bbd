"""The container runtime: `pyunionfs run`'s namespaces, its root on the union, the command's
confinement (capabilities, seccomp) and its init."""

"""The fork server: a resident pyunionfs process that has paid for the imports a FUSE server needs
(the shim, pyfuse3, trio, the filesystem) once, and forks a ready server per mount (server.py);
and the caller's side, which imports next to nothing (client.py)."""

"""Sampling: the class-conditional generators' samplers and the job that runs them.

``ar`` (the KV-cache decode loop, CFG rows, label checks and the categorical
draw RAR and FAR share), ``rar``, ``far``, ``eq_generator`` (column-by-column
flow sampling), ``driver`` (``mode=sample``: resumable sample parts, the ADM
``.npz``) and ``images`` (grids and the official uint8 conversion).

Submodules are imported explicitly (``from genvis_jax.sample import rar``) so that
importing the package stays cheap.
"""

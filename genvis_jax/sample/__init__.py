"""Sampling: the class-conditional generators' samplers and the job that runs them.

``common`` (what every sampler shares: CFG rows, the decoding dtype, one
compiled program per static option set, label checks), ``ar`` (the KV-cache
decode loop and the categorical draw of the token samplers RAR and FAR),
``rar``, ``far``, ``eq_generator`` (column-by-column flow sampling),
``sampler`` (a generator's and its tokenizer's weights loaded once, as a
callable: what ``mode=sample`` and notebooks draw with), ``driver``
(``mode=sample``: resumable sample parts, the ADM ``.npz``),
``parts`` (the part files and their ``settings.json``), ``trained_with``
(the weights pinned to their step folders, checked against the settings they
trained with and the tokenizer their tokens came from) and ``images`` (grids
and the official uint8 conversion).

Submodules are imported explicitly (``from genvis_jax.sample import rar``) so that
importing the package stays cheap.
"""

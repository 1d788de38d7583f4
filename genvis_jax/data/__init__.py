"""Grain input pipelines: demo data, image folders, TFDS, pre-tokenized files.

Entry point: ``create_dataset(config.data, split=..., global_batch_size=...,
seed=...)`` -> ``(iterator, info)``; see ``pipeline.py``.
"""

from genvis_jax.data.demo import DemoSource, demo_landscapes, demo_shapes
from genvis_jax.data.pipeline import PipelineInfo, create_dataset, make_source
from genvis_jax.data.sources import (DataNotFoundError, ImageFolderSource,
                                     TfdsSource)
from genvis_jax.data.tokens import (TokenFileError, TokenSource, TokenWriter, find_token_files,
                                    token_files_exist, write_token_records)

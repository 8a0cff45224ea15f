"""Checkpoint I/O with torch and the standard library only.

Lazy reading of safetensors checkpoints (single file or sharded, validated before anything is allocated;
PyTorch pickles only on opt-in), a streaming sharded safetensors writer, an atomic folder commit and the
copying of config/tokenizer files. Tensor bytes move with positioned reads and writes into and out of memory
that torch owns: no memory-mapping, no numpy, no intermediate copies.
"""

from resilient_tune.checkpoint._atomic import atomic_dir, check_destination
from resilient_tune.checkpoint._format import TensorInfo
from resilient_tune.checkpoint._layout import Layout, locate
from resilient_tune.checkpoint._reader import CheckpointReader, open_checkpoint
from resilient_tune.checkpoint._support_files import copy_support_files
from resilient_tune.checkpoint._writer import StreamingWriter, parse_size

__all__ = [
    "CheckpointReader",
    "Layout",
    "StreamingWriter",
    "TensorInfo",
    "atomic_dir",
    "check_destination",
    "copy_support_files",
    "locate",
    "open_checkpoint",
    "parse_size",
]

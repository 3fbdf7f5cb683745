"""Hugging Face model folders, tensor by tensor: validated lazy reading (safetensors, sharded, .bin:
:mod:`.reading`), sharded safetensors writing with an index (:mod:`.writing`), copying a folder's non-weight files
(:mod:`.folders`) and the fingerprint of the weights a folder holds (:mod:`.fingerprint`)."""

from gradmatch.checkpoints.fingerprint import (FINGERPRINT_PREFIX, _legacy_fingerprint, _sampled_fingerprint,
                                               fingerprint_by, fingerprint_matches, folder_fingerprint)
from gradmatch.checkpoints.folders import copy_non_weight_files
from gradmatch.checkpoints.reading import (BIN_INDEX, BIN_WEIGHTS, HEAD_INIT, MAX_HEADER_BYTES, SAFE_INDEX, SAFE_WEIGHTS,
                                           SAFETENSORS_DTYPES, WEIGHT_LAYOUTS, Checkpoint, ConstantTensors, TensorInfo,
                                           TensorSource, TensorView, find_hessian_folder, match_names,
                                           read_safetensors_header, weight_layout, weight_layouts)
from gradmatch.checkpoints.writing import (SafetensorsWriter, ShardedWriter, TensorSpec, _ShardFile, parse_size,
                                           plan_shards, save_sharded, shard_file_names)

__all__ = ["BIN_INDEX", "BIN_WEIGHTS", "FINGERPRINT_PREFIX", "HEAD_INIT", "MAX_HEADER_BYTES", "SAFE_INDEX",
           "SAFE_WEIGHTS", "SAFETENSORS_DTYPES", "WEIGHT_LAYOUTS", "Checkpoint", "ConstantTensors", "SafetensorsWriter",
           "ShardedWriter", "TensorInfo", "TensorSource", "TensorSpec", "TensorView", "_ShardFile", "_legacy_fingerprint",
           "_sampled_fingerprint", "copy_non_weight_files", "find_hessian_folder", "fingerprint_by",
           "fingerprint_matches", "folder_fingerprint", "match_names", "parse_size", "plan_shards",
           "read_safetensors_header", "save_sharded", "shard_file_names", "weight_layout", "weight_layouts"]

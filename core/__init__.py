"""The core: what every layer above needs and that needs nothing of lverse itself.

Modules:
    files      atomic file output (temporary name, then rename; for an object store, one upload)
    storage    local paths and s3:// URLs alike (fsspec/s3fs): exists, glob, open, checks before work
    config     YAML run configs onto dataclasses (unknown keys refused); CLI flags from them
    formats    the format version of each kind of file lverse writes and reads back, and its check
    shards     shard listing and reading (on disk or S3), stats files (done markers), the AugVAE-hash check
    images     JPEG -> AugVAE input array (decode, centre_crop, to_model_input), decodable images of shards
    resources  device rule ("auto"), workers per stage, each worker's share of the CPU threads
"""

"""Files, checkpoints and the read → compute → write stream, knowing nothing of LoRA.

- :mod:`.files`: reading inputs safely (regular files only, bounded, OS errors as one line).
- :mod:`.safetensors_file`: the safetensors format at byte level (strict header reader, streaming writers).
- :mod:`.layout` and :mod:`.checkpoint`: which files hold a model's weights; lazy tensor access.
- :mod:`.readahead`: keeping the disk busy ahead of the stream.
- :mod:`.pipeline`: the three-thread read → compute → write stream.
- :mod:`.output`: all-or-nothing outputs that never touch an input.
"""

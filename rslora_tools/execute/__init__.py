"""Stage 6, execute: turn a plan into files.

The options of the commands that write (options.py), where a merge goes (outputs.py: a folder, a
GGUF file, a Hub stream) and each output's writer, lowering (the one place that decides how each
planned tensor is produced: copied, kernel or torch), the executor (worker threads writing shards
at their offsets), the recomputation `verify` and `merge --verify` share, and the GGUF writers.
Put here: a new way to produce a tensor (a step kind), a new kind of output and its writer.
"""

"""Stage 6, execute: turn a plan into files.

Lowering (the one place that decides how each planned tensor is produced: copied, kernel or
torch), the executor (worker threads writing shards at their offsets) and the GGUF writer. Put here: a new way to produce a tensor (a step kind), a new output writer.
"""

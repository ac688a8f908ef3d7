"""Stage 1, formats: the files rslora-tools reads and writes, knowing nothing about LoRA.

Single safetensors files (headers parsed and checked, tensors read with pread, written at their
offsets), checkpoint folders (index, shards, side files and the link rule), what a quantized
checkpoint stores, the provenance record, byte sizes, and writing outputs safely (OUT checked
against the inputs, atomic replacement, working folders). Put here: a new file format or a
rule about files and folders.
"""

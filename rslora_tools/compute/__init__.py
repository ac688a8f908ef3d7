"""Stage 5, compute: the arithmetic of one tensor.

The C merge kernel, PEFT's ops in PEFT's order with torch, (de)quantization op for op as
bitsandbytes/GPTQ/AWQ do it, the NaN/Inf check of an adapter, a combined module's factors, a
delta's low-rank factorisation, and quantization error statistics. Put here: a new formula
(and `verify` recomputes with it).
"""

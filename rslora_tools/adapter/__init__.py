"""Stage 2, adapter and scales: a PEFT LoRA adapter and the scale PEFT gives each of its modules.

`adapter_config.json` read once and validated, the adapter's tensors grouped into modules,
PEFT's scale rules (rsLoRA, rank/alpha patterns), each runtime's behaviour with those fields,
config rewrites that keep every scale, adapters derived from others (several stacked, PiSSA-family
made relative to the original base) and the one writer of an adapter folder. Put here: a new
adapter field, a new variant's reading, a runtime's release.
"""

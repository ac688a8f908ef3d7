"""Stage 4, plan: what each output becomes, decided from headers and configs only (no tensor data).

A merge plan (every output tensor, where its value starts, what is applied on top, at which
scale: placement, tied embeddings, quantization, several adapters folded), a streamed merge's
order and disk bound, and what `convert` (config rewrite, unit form, GGUF), `combine` and
`extract` will write. A dry run stops here. Put here: a new decision about what to produce.
"""

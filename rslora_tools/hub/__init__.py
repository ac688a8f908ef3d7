"""Stage 3, hub: the Hugging Face Hub, for inputs and outputs.

How Hub references are written, the client (settings, timeouts, one line per failure), inputs
resolved to cached folders, the model card, the one publish path (`push`, every `--push-to-hub`,
the streamed commit) and a streamed merge's transfers. Put here: anything that talks to the Hub.
"""

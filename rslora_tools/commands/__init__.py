"""Stage 7, commands: what each command does, as a Python function with one options object.

`merge` (and its streamed form), `verify`, `convert`, `combine`, `extract`, `inspect`: resolve
inputs (folders or Hub repos), plan, execute, write the output safely, publish it when asked,
report. Their options objects, but merge's, are in commands.options (light: the CLI reads them
when it starts); `push` is hub.push. Put here: a new command, or a step every command shares
(commands.common).
"""

"""``pema-client serve``: the adapted model behind an OpenAI-compatible HTTP API, on the data
owner's machine, in front of the PLM owner's server.

As vLLM's OpenAI entrypoints: :mod:`.protocol` (the API's schemas), :mod:`.api_router` (thin
routes), :mod:`.serving` (the work: prompts, submission, answers and streams), :mod:`.errors`
(typed errors in OpenAI's shape); :mod:`.models` holds the served adapters, :mod:`.engine` decodes
concurrent requests together, and :mod:`.app` builds the app.
"""

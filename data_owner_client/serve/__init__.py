"""``pema-client serve``: the adapted model behind an OpenAI-compatible HTTP API, on the data
owner's machine, in front of the PLM owner's server (:mod:`.app`), decoding concurrent requests
together (:mod:`.engine`)."""

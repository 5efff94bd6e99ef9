"""The ElevenLabs-compatible face: a second API on the same engine, voices, keys and limits.

Voice agents (Pipecat's ``ElevenLabsTTSService``, LiveKit's ElevenLabs plugin, the official
``elevenlabs`` SDK) speak ElevenLabs' protocol; pointed at this server's URL they work
unchanged. The routes (docs/voice-agents.md):

- ``POST /v1/text-to-speech/{voice_id}`` (+ ``/stream``, ``/with-timestamps``,
  ``/stream/with-timestamps``): ``tts.py``, over ``gateway.speech.service`` and
  ``gateway.speech.utterance``;
- ``GET /v1/voices``, ``GET /v1/voices/{voice_id}``: ``voices.py``;
- the ``stream-input`` and ``multi-stream-input`` WebSockets: ``websocket.py``;
- all of them in one router with the face's error shape: ``routes.py``.

Translation lives here (``protocol.py`` wire types, ``model_ids.py``, ``controls.py``,
``output_formats.py``, ``timings.py``, ``errors.py``); what is new for every face lives in
``gateway.speech`` (``text_stream.py``, ``alignment.py``, ``utterance.py``) and
``gateway.audio.formats``.
"""


"""The OpenAI-compatible server (``tensorweave serve``, the ``serve`` extra): ``engine`` schedules requests over
parallel slots of one model (and mirrors the schedule to the other ranks); ``app`` is the HTTP side (Starlette);
``page`` is the built-in chat page."""

"""``persona serve``: an OpenAI-compatible server that steers per request and monitors persona projections per reply.

Modules, in the order a request meets them: ``app`` (routes, key, errors, SSE) -> ``schema`` (request
shapes) -> ``service`` (validation against the model and traits, ``traits``; picks the scheduler) -> either
``continuous`` (the continuous-batching engine, ``persona.generation.engine``, one scheduler thread) or, where
the engine cannot run, ``batcher`` (bounded queue, dynamic batches) -> ``engine`` (one ``generate`` per batch:
``persona.steering.rows``, ``sampling``); both follow each reply with ``tracker`` and read it with
``monitoring`` -> ``responses``. ``cli`` is the command, ``server`` runs uvicorn.

May import: every stage up to ``commands`` (shared flags); a peer of ``study``, which it does not import.
"""

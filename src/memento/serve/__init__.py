"""``memento serve``: an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn).

- :mod:`~memento.serve.async_engine`: the engine stepped by one thread, requests from asyncio;
- :mod:`~memento.serve.protocol`: the request bodies, their sampling parameters and the documented answers;
- :mod:`~memento.serve.text`: final and streamed text, reasoning split from the answer;
- :mod:`~memento.serve.app`: the routes, errors and metrics.
"""

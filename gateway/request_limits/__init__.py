"""Request limits: bounds on the HTTP request itself, before any handler sees it.

- `checks`: header size and count, and how long a client may leave a promised
  body unsent (ASGI, under any server).
- `protocol`: `gateway serve`'s uvicorn protocol, which bounds the head while it
  arrives, times it out, and caps a worker's connections.
"""

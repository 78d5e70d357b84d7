"""`neo-jax serve`: a serving bundle behind a JSON HTTP API, with dynamic batching.

- `engine`: the `Generator` behind a fixed set of compiled shapes, warmed before the server is ready;
- `batcher`: the queue and the one worker thread that decodes concurrent requests together;
- `schema`: request bodies -> validated `Query` objects, and the OpenAPI description of the same fields;
- `metrics`: the Prometheus figures of `/metrics`;
- `app`: the aiohttp routes, authentication and error answers;
- `server`: the server's lifecycle (listen, warm up, stop), in the foreground or a background thread;
- `commands`: the `neo-jax serve` command line.
"""

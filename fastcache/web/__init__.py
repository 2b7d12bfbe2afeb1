"""aiohttp plumbing shared by the coordinator and the client API, one job a module:
``middleware`` (errors and the token), ``protocol_log`` (aiohttp's own error lines),
``sendfile`` (zero-copy chunk answers), ``validate`` (the JSON-Schema subset and parameters),
``openapi`` (route tables and the document built from them), ``metrics`` (``GET /metrics``).
"""

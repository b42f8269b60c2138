"""The web layer: the Starlette app, the REST handlers, the WebSocket glue, the
wire shapes and API documents, middleware. It translates requests and frames
to calls on the core and back; no rule of the product lives here."""

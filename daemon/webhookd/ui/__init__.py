"""The pages in the browser: the operator's at /ui/ and a tenant's portal at /portal/.

Rendered on the server (aiohttp-jinja2, autoescaped), with one small script of our own that
only refreshes the live parts and asks for confirmations: every page reads, and every form
works, with JavaScript off. The pages call the same Service operations as the API (and
forward a control to the instance delivering the tenant, as the API does): no policy here.
"""

from __future__ import annotations

from webhookd.ui.pages import add_routes

__all__ = ["add_routes"]

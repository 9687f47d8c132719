"""`ratequeue api`: OpenAI's Files and Batches endpoints over HTTP, for services that already use
the official SDK (``base_url`` pointed here). See ``app.py`` for the routes and ``files.py`` for
where uploaded files live."""

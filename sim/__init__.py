"""An OpenAI-compatible API simulator that judges clients: per-model RPM/TPM buckets charged at arrival,
OpenAI's headers and error bodies, seeded faults, and ``/sim/stats`` to count what the client did (down to
the key fingerprint each request came with). ``--dialect azure`` makes it an Azure OpenAI resource
(``sim/azure.py``), ``--dialect openai-compatible`` a self-hosted vLLM/Ollama-like server (``sim/selfhosted.py``).

Independent of ``worker``, ``producer`` and ``config`` on purpose. Start it with ``python -m ratequeue.sim`` /
``ratequeue sim``, or from Python with ``sim.process.start_sim``.
"""

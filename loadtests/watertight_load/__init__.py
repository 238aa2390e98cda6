"""Plumbing of the Locust card traffic in ``loadtests/locustfile.py``.

Owns: the command line arguments, the customer population, the fixed-rate pacing, the ack log
of acknowledged financial transactions, per-cell request names and the SLA gates. The locustfile
tells the story of card traffic; everything here is what it stands on.
Never: log a full card number; send load anywhere but the host it was given.
"""

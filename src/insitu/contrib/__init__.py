"""Building blocks outside insitu's core: usable from Python, not reachable from a strategy or the CLI.

:mod:`~insitu.contrib.he`: Paillier aggregation for a federation with a trusted key holder.
"""

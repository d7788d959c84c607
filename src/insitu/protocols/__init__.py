"""Round protocols as plugins over one typed message envelope.

:mod:`~insitu.protocols.envelope` is the message (both directions) and what a reply may carry;
:mod:`~insitu.protocols.base` the server-half and client-half interfaces; :mod:`~insitu.protocols.plain`
the plain exchange (fit and evaluate tasks); :mod:`~insitu.protocols.secagg` secure aggregation;
:mod:`~insitu.protocols.registry` which protocol a round runs and the client handlers by name.
"""

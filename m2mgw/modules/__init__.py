"""
The module side of the gateway's edge: the UDP listener modules send MGP/1 to.

The protocol here only moves bytes; deciding what a datagram means and what
to answer is the protocol engine's job (:mod:`m2mgw.protocol`).
"""

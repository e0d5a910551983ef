"""
The key lifecycle the gateway drives (issue 4): parameter sets, rotation by
policy and on request.  The protocol rules (what a keyreg must prove) are in
:mod:`m2mgw.protocol.engine`; what is stored, and the events, in the store.
"""

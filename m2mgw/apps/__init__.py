"""
The application side of the gateway's edge: application servers connect over
mutual TLS and speak JSON lines (one request object per line, one answer per
request).
"""

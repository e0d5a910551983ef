"""
m2mgw: a secure gateway for machine-to-machine communication.

Modules (sleeping, battery-powered devices) speak MGP/1 over UDP; application
servers speak JSON lines over mutual TLS.  ``twistd m2mgw`` runs the gateway.
"""

__version__ = "0.1.0"

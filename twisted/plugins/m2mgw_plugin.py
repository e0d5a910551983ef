"""twistd plugin: ``twistd m2mgw`` runs the gateway (see :mod:`m2mgw.tap`)."""

from twisted.application.service import ServiceMaker

m2mgw = ServiceMaker(
    "m2mgw",
    "m2mgw.tap",
    "Secure M2M gateway: MGP/1 modules over UDP, application servers over mutual TLS.",
    "m2mgw",
)

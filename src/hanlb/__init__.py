"""hanlb: highly available network load balancer."""

__version__ = "0.1.0"

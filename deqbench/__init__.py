"""deqbench: a reference harness for Multiscale Deep Equilibrium Models."""

__version__ = "0.1.0"
